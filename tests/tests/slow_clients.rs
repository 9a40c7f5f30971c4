//! Slow readers, awareness storms and limits: no client can hurt the node or anyone else,
//! and no slow client silently loses an update.

use chorus_protocol::{ClientFrame, ErrorCode, ServerFrame};
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::{DEADLINE, TestServer, eventually, http};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use yrs::sync::Awareness;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Transact};

const BUDGET: usize = 64 * 1024;
const UPDATE_BYTES: usize = 10 * 1024;
/// Enough to fill the loopback socket buffers of a reader that stopped reading (a few MB
/// each way) several times over, so the outbox itself is put under pressure.
const UPDATES: usize = 2_000;

async fn stats(addr: SocketAddr) -> serde_json::Value {
    http::get(addr, "/v1/stats").await.expect("stats").json()
}

/// Samples the largest outbox while a run goes on.
fn watch_outboxes(addr: SocketAddr) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let mut max = 0;
        while !s.load(Ordering::Relaxed) {
            if let Ok(r) = http::get(addr, "/v1/stats").await {
                max = max.max(
                    r.json()["outbox"]["largest_pending_bytes"]
                        .as_u64()
                        .unwrap_or(0),
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        max
    });
    (stop, task)
}

/// Pushes `UPDATES` values of ~10 KB, then `done = yes`; returns the writer. With `grow`,
/// each goes to a new key, so the document grows (and so does any catch-up); without, they
/// overwrite one key, so the document's state stays small however much flows through.
async fn push_values(url: &str, doc: &str, grow: bool) -> NativeClient {
    let mut w = NativeClient::connect(url).await;
    w.subscribe_synced(doc).await;
    let value = "v".repeat(UPDATE_BYTES);
    for i in 0..UPDATES {
        let key = if grow {
            format!("k{i}")
        } else {
            "big".to_string()
        };
        w.set_map(doc, &key, &format!("{i}{value}")).await;
        if i % 64 == 0 {
            // Keep reading our own acks so the writer is never the slow one.
            let _ = w.drain_for(Duration::ZERO).await;
        }
    }
    let last = w.set_map(doc, "done", "yes").await;
    w.wait_acked(last).await;
    w
}

/// A fast reader: reads until it has `done`, returns its client.
fn fast_reader(mut c: NativeClient, doc: &'static str) -> tokio::task::JoinHandle<NativeClient> {
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + DEADLINE * 4;
        while c.map_value(doc, "done").as_deref() != Some("yes") {
            assert!(
                tokio::time::Instant::now() < until,
                "fast reader fell behind"
            );
            let _ = c.next_event(Duration::from_millis(100)).await;
        }
        c
    })
}

#[tokio::test]
async fn a_stalled_reader_stays_within_budget_and_converges_when_it_resumes() {
    let server = TestServer::start(|c| {
        c.outbox_bytes = BUDGET;
        // The writer pushes as fast as it can: lift the per-connection message rate.
        c.max_messages_per_second = 1_000_000;
        c.ping_interval = Duration::from_secs(120);
        c.slow_client_timeout = Duration::from_secs(120);
    })
    .await;
    let url = server.ws_url();
    let mut slow = NativeClient::connect_small_window(&url, 16 * 1024).await;
    slow.subscribe_synced("flood").await;
    let mut fast = Vec::new();
    for _ in 0..3 {
        let mut c = NativeClient::connect(&url).await;
        c.subscribe_synced("flood").await;
        fast.push(fast_reader(c, "flood"));
    }
    let (stop, sampler) = watch_outboxes(server.addr);

    // The slow reader simply stops polling its socket from here on.
    let mut writer = push_values(&url, "flood", false).await;
    let writer_sv = writer.state_vector("flood");

    for r in fast {
        let mut c = r.await.expect("fast reader");
        assert_eq!(
            c.state_vector("flood"),
            writer_sv,
            "a fast reader received every update"
        );
        assert_eq!(c.regressions, 0);
    }
    stop.store(true, Ordering::Relaxed);
    let largest = sampler.await.expect("sampler");
    let s = stats(server.addr).await;
    assert!(
        s["outbox"]["sheds"].as_u64().unwrap_or(0) >= 1,
        "the stalled reader's outbox was put over budget (otherwise this test proves nothing): {s}"
    );
    assert!(
        largest as usize <= BUDGET,
        "outbox held {largest} bytes, budget {BUDGET}"
    );

    // Resume reading: the stalled client catches up to exactly the same state.
    let until = tokio::time::Instant::now() + DEADLINE * 2;
    while slow.state_vector("flood") != writer_sv {
        assert!(
            tokio::time::Instant::now() < until,
            "the resumed reader did not converge"
        );
        if let Some(Event::Closed(code)) = slow.next_event(Duration::from_millis(200)).await {
            panic!("stalled reader was closed ({code:?}) under a generous timeout")
        }
    }
    assert_eq!(slow.map_value("flood", "done").as_deref(), Some("yes"));
    assert_eq!(
        slow.regressions, 0,
        "positions never went backwards, even across the catch-up"
    );
}

#[tokio::test]
async fn a_stalled_sse_reader_has_the_same_outbox_bound_and_converges_when_it_resumes() {
    let server = TestServer::start(|c| {
        c.outbox_bytes = BUDGET;
        c.max_messages_per_second = 1_000_000;
        c.ping_interval = Duration::from_secs(120);
        c.slow_client_timeout = Duration::from_secs(120);
    })
    .await;
    let mut slow = chorus_tests::sse::SseClient::connect_small_window(
        server.addr,
        "/v1/docs/sse-flood/events",
        16 * 1024,
    )
    .await;
    assert_eq!(slow.status, 200);
    let (stop, sampler) = watch_outboxes(server.addr);
    // The SSE reader stops reading from here on.
    let mut writer = push_values(&server.ws_url(), "sse-flood", false).await;
    let writer_sv = writer.state_vector("sse-flood");
    stop.store(true, Ordering::Relaxed);
    let largest = sampler.await.expect("sampler");
    let s = stats(server.addr).await;
    assert!(
        s["outbox"]["sheds"].as_u64().unwrap_or(0) >= 1,
        "the stalled SSE reader's outbox went over budget (otherwise this proves nothing): {s}"
    );
    assert!(
        largest as usize <= BUDGET,
        "outbox held {largest} bytes, budget {BUDGET}"
    );
    let events = slow
        .read_until_doc("the resumed SSE reader converges", DEADLINE * 2, |d| {
            use yrs::{ReadTxn, Transact};
            d.transact().state_vector() == writer_sv
        })
        .await;
    assert!(
        events.iter().any(|e| e.name.as_deref() == Some("state")),
        "past the budget the reader was caught up with a state event"
    );
}

#[tokio::test]
async fn past_the_slow_client_timeout_a_stalled_reader_is_closed_with_4001_and_resumes() {
    let server = TestServer::start(|c| {
        c.outbox_bytes = BUDGET;
        // The writer pushes as fast as it can: lift the per-connection message rate.
        c.max_messages_per_second = 1_000_000;
        c.ping_interval = Duration::from_secs(120);
        // Also the grace period the test must land in, polling over HTTP on a busy machine.
        c.slow_client_timeout = Duration::from_secs(4);
    })
    .await;
    let url = server.ws_url();
    let mut slow = NativeClient::connect_small_window(&url, 16 * 1024).await;
    slow.subscribe_synced("flood").await;
    let push = tokio::spawn({
        let url = url.clone();
        // A growing document: a catch-up is as large as what was missed, so a reader that
        // does not read really does stall the socket.
        async move { push_values(&url, "flood", true).await }
    });
    eventually(
        "the server marks the reader as stalled",
        DEADLINE * 2,
        || async {
            (stats(server.addr).await["outbox"]["stalled"].as_u64() >= Some(1)).then_some(())
        },
    )
    .await;
    // It comes back within the grace period: it reads what was in flight, then the close.
    assert_eq!(
        slow.wait_closed().await,
        Some(4001),
        "closed as too slow, told to resume"
    );
    let position = slow.positions["flood"];
    let state = slow
        .doc("flood")
        .transact()
        .encode_state_as_update_v1(&Default::default());
    let mut writer = push.await.expect("writer");
    let writer_sv = writer.state_vector("flood");

    let mut back = NativeClient::connect(&url).await;
    {
        use yrs::updates::decoder::Decode;
        back.doc("flood")
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state).expect("decode"))
            .expect("apply");
    }
    back.subscribe_from("flood", Some(position), None).await;
    back.wait_synced("flood").await;
    assert_eq!(
        back.state_vector("flood"),
        writer_sv,
        "resumed by position to the same state"
    );
    assert_eq!(back.map_value("flood", "done").as_deref(), Some("yes"));
}

fn awareness_update(aw: &mut Awareness, n: u64) -> Vec<u8> {
    aw.set_local_state_raw(format!(r#"{{"cursor":{n}}}"#));
    aw.update().expect("update").encode_v1()
}

#[tokio::test]
async fn an_awareness_storm_is_capped_per_reader_and_ends_with_everyones_newest_state() {
    const CLIENTS: usize = 50;
    const HZ: u32 = 10;
    const STORM: Duration = Duration::from_secs(2);
    let server = TestServer::start(|c| c.awareness_hz = HZ).await;
    let url = server.ws_url();
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let url = url.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = NativeClient::connect(&url).await;
            c.subscribe_synced("storm").await;
            let mut aw = Awareness::new(yrs::Doc::with_client_id(1000 + i as u64));
            start.wait().await;
            // 50 Hz of cursor moves, reading all the while.
            let mut frames_during_storm = 0u32;
            let mut seen: HashMap<u64, String> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let begin = tokio::time::Instant::now();
            let mut n = 0;
            while begin.elapsed() < STORM {
                tokio::select! {
                    _ = tick.tick() => {
                        n += 1;
                        let u = awareness_update(&mut aw, n);
                        c.send(&ClientFrame::Awareness { doc: "storm".into(), update: u }).await;
                    }
                    ev = c.next_event(Duration::from_millis(5)) => {
                        if let Some(Event::Frame(f @ ServerFrame::Awareness { .. })) = ev {
                            frames_during_storm += 1;
                            record(&mut seen, &f);
                        }
                    }
                }
            }
            // The final state everyone must end with.
            let last = awareness_update(&mut aw, 1_000_000);
            c.send(&ClientFrame::Awareness {
                doc: "storm".into(),
                update: last,
            })
            .await;
            (c, seen, frames_during_storm)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client"));
    }
    let cap = HZ * STORM.as_secs() as u32 + 3;
    for (i, (c, seen, frames)) in clients.iter_mut().enumerate() {
        assert!(
            *frames <= cap,
            "reader {i} got {frames} awareness frames in {STORM:?}, cap {cap}"
        );
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let newest = (0..CLIENTS as u64)
                .filter(|p| *p != i as u64)
                .all(|p| seen.get(&(1000 + p)).is_some_and(|j| j.contains("1000000")));
            if newest {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "reader {i} lacks some peer's newest state"
            );
            if let Some(Event::Frame(f @ ServerFrame::Awareness { .. })) =
                c.next_event(Duration::from_millis(50)).await
            {
                record(seen, &f);
            }
        }
        assert!(c.errors.is_empty(), "{:?}", c.errors);
    }
}

fn record(seen: &mut HashMap<u64, String>, f: &ServerFrame) {
    use yrs::updates::decoder::Decode;
    if let ServerFrame::Awareness { update, .. } = f {
        let u =
            yrs::sync::awareness::AwarenessUpdate::decode_v1(update).expect("awareness decodes");
        for (id, e) in u.clients {
            seen.insert(id.get(), e.json.to_string());
        }
    }
}

#[tokio::test]
async fn each_limit_answers_with_its_documented_error_or_status() {
    let server = TestServer::start(|c| {
        c.max_connections = 3;
        c.max_connections_per_second = 1000;
        c.max_messages_per_second = 5;
        c.max_document_bytes = 1000;
    })
    .await;
    let url = server.ws_url();
    let mut a = NativeClient::connect(&url).await;
    let _b = NativeClient::connect(&url).await;
    let _c = NativeClient::connect(&url).await;
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503, "over --max-connections");
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!(
            "a fourth connection was not refused: {:?}",
            other.map(|_| ())
        ),
    }

    // Messages per second: a burst past the bucket gets `rate_limited`, the socket survives.
    a.subscribe_synced("limits").await;
    for i in 0..14 {
        let mut aw = Awareness::new(yrs::Doc::with_client_id(7));
        let u = awareness_update(&mut aw, i);
        a.send(&ClientFrame::Awareness {
            doc: "limits".into(),
            update: u,
        })
        .await;
    }
    a.wait_for(|f| {
        matches!(
            f,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        )
    })
    .await;

    // ...and it keeps working once the rate allows again.
    drop(a);

    // Document size: an update that would take the document past the limit is refused; the
    // document stays readable and what was accepted stays.
    let mut d = NativeClient::connect_when_admitted(&url).await;
    d.subscribe_synced("small").await;
    let ok = d.insert("small", 0, &"a".repeat(500)).await;
    d.wait_acked(ok).await;
    let too_much = d.insert("small", 500, &"b".repeat(600)).await;
    let e = d
        .wait_for(|f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::DocumentTooLarge,
                    ..
                }
            )
        })
        .await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(s), .. } if s == too_much));
    let state = http::get(server.addr, "/v1/docs/small").await.expect("GET");
    assert_eq!(state.status, 200);
    assert!(
        state.body.len() < 1000,
        "the refused update was not applied"
    );
}

#[tokio::test]
async fn connection_rate_is_limited_with_429_and_retry_after() {
    let server = TestServer::start(|c| c.max_connections_per_second = 2).await;
    let url = server.ws_url();
    let _a = NativeClient::connect(&url).await;
    let _b = NativeClient::connect(&url).await;
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            let retry: u64 = resp.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!((1..=2).contains(&retry), "retry-after {retry}");
        }
        other => panic!(
            "a third connection within the second was not refused: {:?}",
            other.map(|_| ())
        ),
    }
}

/// `--flush-interval`: what arrives within the interval after a write waits for the next
/// one, which carries it all; nothing is held back once the interval has passed.
#[tokio::test]
async fn with_a_flush_interval_updates_share_writes_and_none_is_held_back() {
    const INTERVAL: Duration = Duration::from_millis(50);
    let server = TestServer::start(|c| c.flush_interval = INTERVAL).await;
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut r = NativeClient::connect(&server.ws_url()).await;
        r.subscribe_synced("flush").await;
        readers.push(r);
    }
    let mut w = NativeClient::connect(&server.ws_url()).await;
    w.subscribe_synced("flush").await;
    let before = stats(server.addr).await;
    let started = std::time::Instant::now();
    // Typing pace: one insert every 5 ms, each its own log entry and fan-out.
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    let mut last = 0;
    for i in 0..100u32 {
        pace.tick().await;
        last = w.insert("flush", i, "x").await;
    }
    w.wait_acked(last).await;
    let expected = "x".repeat(100);
    for r in &mut readers {
        r.wait_text("flush", &expected).await;
    }
    let after = stats(server.addr).await;
    let elapsed = started.elapsed();
    let delta = |k: &str| {
        after["outbox"][k].as_u64().expect("counter")
            - before["outbox"][k].as_u64().expect("counter")
    };
    let (writes, frames) = (delta("writes"), delta("frames_written"));
    assert!(writes > 0, "writes are counted");
    // After a write, a connection's next one waits for the node's next flush tick, so each
    // of the 4 connections (3 readers, the writer getting its acks) writes at most once per
    // tick, plus once before the first: ticks in `elapsed` are at most elapsed / interval + 1.
    // (Without the interval each insert is its own write on every connection: about 400.)
    let per_connection = (elapsed.as_millis() / INTERVAL.as_millis()) as u64 + 2;
    assert!(
        writes <= 4 * per_connection,
        "{writes} writes in {elapsed:?} ({frames} frames): more than one per connection per flush tick"
    );
    server.stop().await;
}

/// yhub#55: a joiner whose whole-document answer takes longer than the heartbeat still gets
/// pings while the answer is written (between its fragments), so it can answer them and the
/// silence check never closes it mid-answer. The joiner reads nothing until a second client
/// has been pinged: by then the sweep has queued a ping for the joiner too, while its answer
/// (far larger than the loopback buffers) is stuck mid-way.
#[tokio::test]
async fn a_joiner_gets_pings_between_the_fragments_of_its_long_answer() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const DOC_MB: usize = 16;
    let server = TestServer::start(|c| {
        c.ping_interval = Duration::from_millis(300);
        c.ping_timeout = Duration::from_secs(60);
        c.slow_client_timeout = Duration::from_secs(60);
        c.max_update_bytes = 64 << 20;
        c.max_message_bytes = 64 << 20;
        c.max_api_requests_per_second = 1_000;
    })
    .await;
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    let chunk = "abcdefghij".repeat(100_000);
    for _ in 0..DOC_MB {
        let mut txn = doc.transact_mut();
        let at = yrs::Text::len(&text, &txn);
        yrs::Text::insert(&text, &mut txn, at, &chunk);
    }
    let update = doc
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    let posted = http::post(server.addr, "/v1/docs/huge/updates", &update)
        .await
        .expect("post");
    assert_eq!(posted.status, 200, "seeded");

    let joiner_url = format!("{}/huge", server.yjs_base());
    // A small receive window, so the loopback buffers hold only a few MB of the answer.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let stream = socket.connect(server.addr).await.expect("connect");
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (mut joiner, _) =
        tokio_tungstenite::client_async_with_config(&joiner_url, stream, Some(config))
            .await
            .expect("joiner handshake");
    // Sync step 1 with an empty state vector: the whole document, please.
    joiner
        .send(Message::Binary(vec![0, 0, 1, 0].into()))
        .await
        .expect("step 1");
    let (mut witness, _) = tokio_tungstenite::connect_async(format!("{}/other", server.yjs_base()))
        .await
        .expect("witness");
    tokio::time::timeout(DEADLINE, async {
        while !matches!(witness.next().await, Some(Ok(Message::Ping(_)))) {}
    })
    .await
    .expect("the witness was pinged");

    let mut pinged = false;
    let answer = tokio::time::timeout(DEADLINE * 4, async {
        loop {
            match joiner.next().await {
                Some(Ok(Message::Ping(_))) => pinged = true,
                Some(Ok(Message::Binary(b))) if b.starts_with(&[0, 1]) => return b.len(),
                Some(Ok(_)) => {}
                other => panic!("joiner closed before its answer: {other:?}"),
            }
        }
    })
    .await
    .expect("the answer arrived");
    assert!(
        answer >= update.len(),
        "the whole document came ({answer} B)"
    );
    assert!(
        pinged,
        "a ping reached the joiner before its answer was complete"
    );
}

async fn writers(addr: SocketAddr) -> u64 {
    stats(addr).await["outbox"]["writers"]
        .as_u64()
        .expect("outbox.writers in /v1/stats")
}

#[tokio::test]
async fn a_connection_has_a_writer_task_only_while_something_waits_for_its_socket() {
    let server = TestServer::start(|c| {
        c.outbox_bytes = BUDGET;
        c.max_messages_per_second = 1_000_000;
        c.ping_interval = Duration::from_secs(120);
        c.slow_client_timeout = Duration::from_secs(120);
    })
    .await;
    let (url, addr) = (server.ws_url(), server.addr);
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut c = NativeClient::connect(&url).await;
        c.subscribe_synced("w").await;
        idle.push(c);
    }
    eventually("no writer for idle connections", DEADLINE, || async {
        (writers(addr).await == 0).then_some(())
    })
    .await;
    drop(idle);

    // A reader that stops reading while the document changes: what it cannot take waits in
    // its outbox, and its writer runs (stuck on the full socket) until it reads again.
    let mut slow = NativeClient::connect_small_window(&url, 16 * 1024).await;
    slow.subscribe_synced("w").await;
    let mut w = push_values(&url, "w", false).await;
    eventually("a writer for the stalled reader", DEADLINE, || async {
        (writers(addr).await >= 1).then_some(())
    })
    .await;

    let until = tokio::time::Instant::now() + DEADLINE * 2;
    while slow.map_value("w", "done").as_deref() != Some("yes") {
        assert!(tokio::time::Instant::now() < until, "the reader caught up");
        let _ = slow.next_event(Duration::from_millis(100)).await;
    }
    let _ = w.drain_for(Duration::from_millis(100)).await;
    eventually("no writer once everything is written", DEADLINE, || async {
        (writers(addr).await == 0).then_some(())
    })
    .await;
}
