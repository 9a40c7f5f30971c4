//! What a reader may cost a node: reading a document nobody wrote stores nothing (embedded and
//! Redis), a socket cannot churn through documents by subscribing and unsubscribing, the node
//! holds at most `--max-hot-documents` documents, and the document API is rate-limited per
//! address.

use chorus_protocol::{ClientFrame, ErrorCode, ServerFrame, StreamId};
use chorus_server::backplane::embedded::EmbeddedBackplane;
use chorus_server::backplane::{Backplane, LogHead};
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::redis::RedisServer;
use chorus_tests::{DEADLINE, TestServer, eventually, http};
use futures_util::StreamExt;
use std::time::Duration;

async fn stats(server: &TestServer) -> serde_json::Value {
    http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json()
}

async fn upgrade_status(url: &str) -> Option<u16> {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Some(resp.status().as_u16()),
        Ok(_) => None,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Every way to read a document (native subscribe, GET, long-poll, y-websocket), on ids nobody
/// ever wrote, leaves Redis without a single key for them. A reader that subscribed before the
/// log existed (its position is epoch 0) gets the first write through a full sync, and resuming
/// from that epoch-0 position later is a full sync too, never a replay.
#[tokio::test]
async fn reads_of_unwritten_documents_create_no_redis_keys_and_the_first_write_reaches_readers() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(|c| c.redis_url = vec![redis.url()]).await;

    let mut reader = NativeClient::connect(&server.ws_url()).await;
    let (_, early, _) = reader.subscribe_synced("ghost").await;
    assert_eq!(early.epoch, 0, "no log yet: epoch 0");
    let got = http::get(server.addr, "/v1/docs/ghost-get")
        .await
        .expect("GET");
    assert_eq!((got.status, got.body.as_slice()), (200, &[0u8, 0][..]));
    assert_eq!(got.header("x-chorus-position"), Some("0.0-0"));
    let polled = http::get(server.addr, "/v1/docs/ghost-poll/updates?wait=0")
        .await
        .expect("long-poll");
    assert!(polled.status < 300, "long-poll answered {}", polled.status);
    let (mut y, _) = tokio_tungstenite::connect_async(format!("{}/ghost-y", server.yjs_base()))
        .await
        .expect("y-websocket");
    let first = tokio::time::timeout(DEADLINE, y.next()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "sync step 1 arrives");
    drop(y);

    let keys = redis.cli(&["KEYS", "chorus:{ghost*"]).await;
    assert_eq!(keys.trim(), "", "reads created keys: {keys}");

    // The first write creates the log; the early reader gets it (through a full sync).
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("ghost").await;
    let s = writer.insert("ghost", 0, "hello").await;
    let acked = writer.wait_acked(s).await;
    assert_ne!(acked.epoch, 0, "the first write gave the log its epoch");
    reader.wait_text("ghost", "hello").await;
    assert_eq!(reader.positions["ghost"].epoch, acked.epoch);
    assert_eq!(reader.regressions, 0);

    // Coming back with the epoch-0 position: a full state, not an (empty) replay.
    let mut late = NativeClient::connect(&server.ws_url()).await;
    late.subscribe_from("ghost", Some(early), None).await;
    let (_, position, replay) = late.wait_synced("ghost").await;
    assert!(!replay, "an epoch-0 position is never replayed from");
    assert_eq!(position.epoch, acked.epoch);
    assert_eq!(late.text("ghost"), "hello");
    assert_ne!(
        redis.cli(&["EXISTS", "chorus:{ghost}:log"]).await.trim(),
        "0"
    );
}

/// The embedded log: a GET of a document nobody wrote leaves no row behind, so after a restart
/// it still has no log.
#[tokio::test]
async fn reads_of_unwritten_documents_leave_no_row_in_the_embedded_log() {
    let server = TestServer::start(|_| {}).await;
    let got = http::get(server.addr, "/v1/docs/never-written")
        .await
        .expect("GET");
    assert_eq!(got.status, 200);
    let mut reader = NativeClient::connect(&server.ws_url()).await;
    reader.subscribe_synced("never-subscribed").await;
    reader.close().await;
    let data_dir = server.data_dir.clone();
    let _keep = server.stop_keep_data().await;

    let tracker = tokio_util::task::TaskTracker::new();
    let log = EmbeddedBackplane::open(&data_dir.join("log.redb"), 1 << 20, &tracker).expect("log");
    for doc in ["never-written", "never-subscribed"] {
        let doc = chorus_protocol::DocId::parse(doc).expect("doc");
        let (head, entries) = log.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(head, LogHead::NONE, "{doc}: a read stored a log head");
        assert!(entries.is_empty());
    }
    log.close().await;
}

/// Unsubscribing frees a place under `--max-docs-per-connection`; a socket that subscribes and
/// unsubscribes in a loop is still held to `--max-subscribes-per-second` new documents.
#[tokio::test]
async fn subscribe_unsubscribe_cycles_are_held_to_the_new_subscription_rate() {
    let server = TestServer::start(|c| {
        c.max_docs_per_connection = 2;
        c.max_subscribes_per_second = 1;
    })
    .await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    const CYCLES: usize = 10;
    let started = std::time::Instant::now();
    for i in 0..CYCLES {
        let doc = format!("churn-{i}");
        c.subscribe_from(&doc, None, None).await;
        c.send(&ClientFrame::Unsubscribe { doc }).await;
    }
    let (mut synced, mut limited) = (0, 0);
    while synced + limited < CYCLES {
        match c.next_event(DEADLINE).await {
            Some(Event::Frame(ServerFrame::Synced { .. })) => synced += 1,
            Some(Event::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                doc: Some(_),
                ..
            })) => limited += 1,
            Some(Event::Frame(_)) => {}
            other => panic!("expected synced or rate_limited, got {other:?}"),
        }
    }
    // A burst of two, then one a second for however long this took.
    let allowed = 2 + started.elapsed().as_secs() as usize + 1;
    assert!(
        synced <= allowed && limited >= CYCLES.saturating_sub(allowed),
        "{synced} loaded, {limited} refused"
    );
    assert!(c.closed.is_none(), "refused, not disconnected");
}

/// At `--max-hot-documents` a document in use is never unloaded: opening another one is refused
/// with a clear, retryable answer on every path; once a document goes idle it is unloaded early
/// to make room.
#[tokio::test]
async fn the_node_holds_at_most_max_hot_documents_and_makes_room_from_idle_ones() {
    let server = TestServer::start(|c| {
        c.max_hot_documents = 2;
        c.evict_after = Duration::from_secs(600);
    })
    .await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("hot-1").await;
    c.subscribe_synced("hot-2").await;

    c.subscribe_from("hot-3", None, None).await;
    let refused = c
        .wait_for(|f| matches!(f, ServerFrame::Error { doc: Some(d), .. } if d == "hot-3"))
        .await;
    let ServerFrame::Error { code, message, .. } = refused else {
        unreachable!()
    };
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(code.retryable());
    assert!(message.contains("max-hot-documents"), "{message}");
    let got = http::get(server.addr, "/v1/docs/hot-3").await.expect("GET");
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"], "node_full");
    assert!(got.header("retry-after").is_some());
    let y = format!("{}/hot-3", server.yjs_base());
    assert_eq!(upgrade_status(&y).await, Some(503));
    let s = stats(&server).await;
    assert_eq!(s["hot_documents"], 2);
    assert!(s["refused_hot_documents"].as_u64() >= Some(2), "{s}");

    // hot-1 goes idle: the next load unloads it early instead of refusing.
    c.send(&ClientFrame::Unsubscribe {
        doc: "hot-1".into(),
    })
    .await;
    eventually("hot-3 loads once hot-1 is idle", DEADLINE, || async {
        let r = http::get(server.addr, "/v1/docs/hot-3").await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    assert_eq!(stats(&server).await["hot_documents"], 2);
    // hot-2, still subscribed, was not touched.
    let s = c.insert("hot-2", 0, "still here").await;
    c.wait_acked(s).await;
}

/// `--max-api-requests-per-second` per address: over it the document API answers 429 with
/// Retry-After, and other routes are not affected.
#[tokio::test]
async fn the_document_api_is_rate_limited_per_address() {
    let server = TestServer::start(|c| c.max_api_requests_per_second = 1).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = http::get(server.addr, "/v1/docs/rl").await.expect("GET");
        if r.status == 429 {
            assert_eq!(r.json()["error"], "rate_limited");
            let retry: u64 = r
                .header("retry-after")
                .and_then(|v| v.parse().ok())
                .expect("Retry-After");
            assert!(retry >= 1);
        }
        statuses.push(r.status);
    }
    // A burst of two, then one a second: six requests in a row cannot all pass.
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(statuses[0], 200);
    let health = http::get(server.addr, "/healthz").await.expect("healthz");
    assert_eq!(health.status, 200, "only the document API is limited");
    assert!(stats(&server).await["refused_api_requests"].as_u64() >= Some(1));
}
