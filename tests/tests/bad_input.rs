//! Bad input gets a typed error or a documented close code; everyone else keeps working.

use chorus_protocol::{ClientFrame, ErrorCode, ServerFrame};
use chorus_tests::native::NativeClient;
use chorus_tests::{TestServer, http};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(c: &mut NativeClient, code: ErrorCode) -> ServerFrame {
    c.wait_for(|f| matches!(f, ServerFrame::Error { code: got, .. } if *got == code))
        .await
}

/// A healthy second client on the same node still works end to end.
async fn bystander_still_works(server: &TestServer, doc: &str) {
    let mut a = NativeClient::connect(&server.ws_url()).await;
    let mut b = NativeClient::connect(&server.ws_url()).await;
    a.subscribe_synced(doc).await;
    b.subscribe_synced(doc).await;
    let s = a.insert(doc, 0, "still fine").await;
    a.wait_acked(s).await;
    b.wait_text(doc, "still fine").await;
}

fn nested_any(depth: usize) -> Vec<u8> {
    let mut u = vec![1, 1, 1, 0, 0b0010_0000 | 8, 1, 1, b'm', 1, b'k', 1];
    for _ in 0..depth {
        u.extend([117, 1]);
    }
    u.extend([126, 0]);
    u
}

#[tokio::test]
async fn each_kind_of_bad_frame_gets_its_documented_answer() {
    let server = TestServer::start(|c| c.max_message_bytes = 64 * 1024).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;

    c.send_raw(Message::Binary(vec![0xc1, 0x00, 0xff].into()))
        .await;
    expect_error(&mut c, ErrorCode::BadFrame).await;

    let unknown = rmp_frame(serde_json::json!({"type": "teleport", "doc": "x"}));
    c.send_raw(Message::Binary(unknown.into())).await;
    expect_error(&mut c, ErrorCode::UnknownFrame).await;

    c.subscribe_from("../etc/passwd", None, None).await;
    expect_error(&mut c, ErrorCode::BadDocId).await;

    c.send(&ClientFrame::Update {
        doc: "notmine".into(),
        update: vec![0, 0],
        seq: Some(1),
    })
    .await;
    expect_error(&mut c, ErrorCode::NotSubscribed).await;

    c.subscribe_synced("bad").await;
    c.send(&ClientFrame::Update {
        doc: "bad".into(),
        update: vec![1, 2, 3, 4, 5],
        seq: Some(2),
    })
    .await;
    let e = expect_error(&mut c, ErrorCode::BadUpdate).await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(2), doc: Some(ref d), .. } if d == "bad"));

    // The stack-overflow crasher of yrs 0.28.1 (reliability.md §2) is refused, not decoded.
    c.send(&ClientFrame::Update {
        doc: "bad".into(),
        update: nested_any(7_000),
        seq: Some(3),
    })
    .await;
    let e = expect_error(&mut c, ErrorCode::BadUpdate).await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(3), .. }));

    c.send(&ClientFrame::Subscribe {
        doc: "bad".into(),
        position: None,
        state_vector: Some(vec![0x80, 0xe5, 0x9a, 0x77]),
    })
    .await;
    expect_error(&mut c, ErrorCode::BadStateVector).await;

    c.send(&ClientFrame::Awareness {
        doc: "bad".into(),
        update: vec![1, 1, 1, 5, b'{', b'n', b'o', b'p', b'e'],
    })
    .await;
    expect_error(&mut c, ErrorCode::BadAwareness).await;

    // None of that reached the log: the document is still empty.
    let state = http::get(server.addr, "/v1/docs/bad").await.expect("GET");
    assert_eq!(state.body, vec![0, 0], "no rejected update was applied");

    // A text frame on the binary protocol closes with 1003.
    c.send_raw(Message::Text("hello".into())).await;
    assert_eq!(c.wait_closed().await, Some(1003));

    // An oversized message closes with 1009.
    let mut big = NativeClient::connect(&server.ws_url()).await;
    big.subscribe_synced("bad").await;
    big.send_raw(Message::Binary(vec![0u8; 100 * 1024].into()))
        .await;
    assert_eq!(big.wait_closed().await, Some(1009));

    bystander_still_works(&server, "bystander").await;
}

#[tokio::test]
async fn an_error_storm_is_closed_with_1008() {
    let server = TestServer::start(|_| {}).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    for _ in 0..200 {
        c.send_raw(Message::Binary(vec![0xc1].into())).await;
    }
    assert_eq!(c.wait_closed().await, Some(1008));
    bystander_still_works(&server, "storm").await;
}

#[tokio::test]
async fn too_many_documents_on_one_socket_is_refused_per_document() {
    let server = TestServer::start(|c| c.max_docs_per_connection = 2).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("d1").await;
    c.subscribe_synced("d2").await;
    c.subscribe_from("d3", None, None).await;
    expect_error(&mut c, ErrorCode::TooManyDocs).await;
    // The two it holds keep working.
    let s = c.insert("d2", 0, "ok").await;
    c.wait_acked(s).await;
    let _ = c.drain_for(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn y_websocket_endpoint_refuses_bad_doc_ids_and_garbage() {
    let server = TestServer::start(|_| {}).await;
    let bad = http::get(server.addr, "/y/has%20space").await.expect("GET");
    assert_eq!(bad.status, 400);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/ok", server.yjs_base()))
        .await
        .expect("connect");
    use futures_util::{SinkExt, StreamExt};
    for _ in 0..100 {
        ws.send(Message::Binary(vec![0, 9, 9].into()))
            .await
            .expect("send");
    }
    let mut code = None;
    while let Some(Ok(m)) = tokio::time::timeout(chorus_tests::DEADLINE, ws.next())
        .await
        .expect("timely close")
    {
        if let Message::Close(c) = m {
            code = c.map(|c| u16::from(c.code));
            break;
        }
    }
    assert_eq!(code, Some(1008));
    bystander_still_works(&server, "ok").await;
}

/// An update with one character from each of `clients` yrs clients, in root text "t".
fn crowd_update(clients: u64) -> Vec<u8> {
    fn var(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut u = Vec::new();
    var(&mut u, clients);
    for c in 1..=clients {
        u.push(1);
        var(&mut u, c);
        u.extend([0, 4, 1, 1, b't', 1, b'x']);
    }
    u.push(0);
    u
}

#[tokio::test]
async fn an_update_of_too_many_clients_is_refused_as_too_large_on_every_protocol() {
    let server = TestServer::start(|_| {}).await;
    let over = crowd_update(chorus_server::validate::MAX_UPDATE_CLIENTS as u64 + 1);
    assert!(over.len() < 1 << 20, "well within the byte limits");

    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("crowd").await;
    c.send(&ClientFrame::Update {
        doc: "crowd".into(),
        update: over.clone(),
        seq: Some(1),
    })
    .await;
    let e = expect_error(&mut c, ErrorCode::TooLarge).await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(1), .. }));

    let resp = http::post(server.addr, "/v1/docs/crowd/updates", &over)
        .await
        .expect("POST");
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["error"], "too_large");

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/crowd", server.yjs_base()))
        .await
        .expect("connect");
    use futures_util::{SinkExt, StreamExt};
    // y-protocols: sync message, update, then the update as a length-prefixed buffer.
    let mut msg = vec![0, 2];
    let mut len = over.len();
    while len >= 0x80 {
        msg.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    msg.push(len as u8);
    msg.extend_from_slice(&over);
    ws.send(Message::Binary(msg.into())).await.expect("send");
    let mut code = None;
    while let Some(Ok(m)) = tokio::time::timeout(chorus_tests::DEADLINE, ws.next())
        .await
        .expect("timely close")
    {
        if let Message::Close(c) = m {
            code = c.map(|c| u16::from(c.code));
            break;
        }
    }
    assert_eq!(code, Some(1009));

    let state = http::get(server.addr, "/v1/docs/crowd").await.expect("GET");
    assert_eq!(state.body, vec![0, 0], "none of them reached the log");
    // One client fewer is an ordinary update.
    let at_limit = crowd_update(chorus_server::validate::MAX_UPDATE_CLIENTS as u64);
    let resp = http::post(server.addr, "/v1/docs/crowd/updates", &at_limit)
        .await
        .expect("POST");
    assert_eq!(resp.status, 200);
    bystander_still_works(&server, "after-crowd").await;
}

fn rmp_frame(v: serde_json::Value) -> Vec<u8> {
    // MessagePack of an arbitrary map, as a third-party client would send it.
    let mut out = Vec::new();
    let map = v.as_object().expect("map");
    out.push(0x80 | map.len() as u8);
    for (k, v) in map {
        for s in [k.as_str(), v.as_str().expect("string values only")] {
            out.push(0xa0 | s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

/// Two updates of one writer, the second building on the first.
fn dependent_pair() -> (Vec<u8>, Vec<u8>) {
    use yrs::{Doc, ReadTxn, StateVector, Text, Transact};
    let doc = Doc::with_client_id(4242);
    let text = doc.get_or_insert_text("t");
    text.insert(&mut doc.transact_mut(), 0, "first ");
    let first = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    let after_first = doc.transact().state_vector();
    text.insert(&mut doc.transact_mut(), 6, "second");
    let second = doc.transact().encode_state_as_update_v1(&after_first);
    (first, second)
}

#[tokio::test]
async fn an_update_whose_dependencies_never_arrive_is_refused_and_never_logged() {
    let server = TestServer::start(|c| c.missing_deps_wait = Duration::from_millis(300)).await;
    let (_first, second) = dependent_pair();
    let mut c = NativeClient::connect(&server.ws_url()).await;
    let mut watcher = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("orphans").await;
    watcher.subscribe_synced("orphans").await;
    let seq = c.send_update("orphans", second.clone()).await;
    let e = expect_error(&mut c, ErrorCode::MissingDependencies).await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(s), .. } if s == seq));

    // The HTTP API refuses it the same way.
    let resp = http::post(server.addr, "/v1/docs/orphans/updates", &second)
        .await
        .expect("POST");
    assert_eq!(resp.status, 409);
    assert_eq!(resp.json()["error"], "missing_dependencies");

    // Nothing reached the log or the other client; the document still encodes.
    let state = http::get(server.addr, "/v1/docs/orphans")
        .await
        .expect("GET");
    assert_eq!(state.body, vec![0, 0]);
    assert!(
        watcher
            .drain_for(Duration::from_millis(100))
            .await
            .iter()
            .all(|e| !matches!(
                e,
                chorus_tests::native::Event::Frame(ServerFrame::Update { .. })
            )),
        "the refused update never reached another client"
    );
    let stats = http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json();
    assert_eq!(stats["refused_missing_dependencies"], 2);
    bystander_still_works(&server, "orphans").await;
}

#[tokio::test]
async fn an_update_waits_for_a_dependency_that_arrives_from_another_writer() {
    let server = TestServer::start(|c| c.missing_deps_wait = Duration::from_secs(10)).await;
    let (first, second) = dependent_pair();
    let mut late = NativeClient::connect(&server.ws_url()).await;
    let mut early = NativeClient::connect(&server.ws_url()).await;
    let mut reader = NativeClient::connect(&server.ws_url()).await;
    late.subscribe_synced("relay").await;
    early.subscribe_synced("relay").await;
    reader.subscribe_synced("relay").await;
    // The dependent update arrives first (as when its writer moved to a node that has not
    // read the first one yet); it is held, not parked in the document or refused.
    let s2 = late.send_update("relay", second).await;
    let s1 = early.send_update("relay", first).await;
    early.wait_acked(s1).await;
    late.wait_acked(s2).await;
    reader.wait_text("relay", "first second").await;
    let state = http::get(server.addr, "/v1/docs/relay").await.expect("GET");
    let doc = yrs::Doc::new();
    {
        use yrs::updates::decoder::Decode;
        use yrs::{ReadTxn, Transact};
        let mut txn = doc.transact_mut();
        txn.apply_update(yrs::Update::decode_v1(&state.body).expect("decodes"))
            .expect("applies");
        assert!(
            !txn.has_missing_updates(),
            "nothing is pending on the server"
        );
    }
}

#[tokio::test]
async fn a_flood_of_orphan_updates_is_refused_without_growing_the_document() {
    // reliability.md §2: 20k updates whose predecessor never arrives cost yrs 47 s of CPU and
    // sit in `pending` forever. Here each is refused at once and the sender is soon closed.
    let server = TestServer::start(|c| c.missing_deps_wait = Duration::ZERO).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("flood").await;
    // Enough to exhaust the error budget (20) several times over, few enough that the client
    // is not still writing when the close arrives.
    for i in 0..60u32 {
        // Each continues client 77 from clock 1,000 + i: clock 0 never arrives.
        let mut u = vec![1, 1, 77];
        let mut clock = 1_000 + i;
        while clock >= 0x80 {
            u.push((clock as u8 & 0x7f) | 0x80);
            clock >>= 7;
        }
        u.push(clock as u8);
        u.extend([4, 1, 1, b't', 1, b'x', 0]); // string "x" in root text "t"; no deletions
        c.send_update("flood", u).await;
    }
    assert_eq!(c.wait_closed().await, Some(1008));
    let state = http::get(server.addr, "/v1/docs/flood").await.expect("GET");
    assert_eq!(state.body, vec![0, 0], "nothing was appended");
    bystander_still_works(&server, "flood").await;
}
