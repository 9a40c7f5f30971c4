//! No sticky sessions: the shipped nginx config (plain round-robin) in front of two `chorus`
//! processes sharing one Redis. WebSocket writers, SSE readers and long-pollers all converge;
//! one node is killed with SIGKILL and its clients land on the other and resume by position,
//! with every acknowledged edit present exactly once everywhere.

use chorus_protocol::{Position, ServerFrame};
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::nginx::Nginx;
use chorus_tests::redis::RedisServer;
use chorus_tests::sse::SseClient;
use chorus_tests::{DEADLINE, ServerProcess, http};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use yrs::{GetString, Transact};

const DOC: &str = "lb";

/// Sends one token and waits for its ack; if the socket dies (its node was killed), reconnects
/// through the balancer, resubscribes from its position and resends its whole state (CRDT
/// updates apply once), as a real client does. Returns true if it had to reconnect.
async fn write_acked(c: &mut NativeClient, lb: &str, token: &str) -> bool {
    let len = c.text(DOC).chars().count() as u32;
    let seq = c.insert(DOC, len, token).await;
    let until = Instant::now() + DEADLINE;
    loop {
        match c
            .next_event(until.saturating_duration_since(Instant::now()))
            .await
        {
            Some(Event::Frame(ServerFrame::Ack { seq: Some(s), .. })) if s == seq => return false,
            Some(Event::Frame(ServerFrame::Error { seq: Some(s), .. })) if s == seq => break,
            Some(Event::Frame(_)) => {}
            Some(Event::Closed(_)) => break,
            None => panic!("no ack for {token} within {DEADLINE:?}"),
        }
    }
    let mut fresh = NativeClient::connect(lb).await;
    fresh.docs = std::mem::take(&mut c.docs);
    fresh.positions = std::mem::take(&mut c.positions);
    fresh.subscribe(DOC).await;
    fresh.wait_synced(DOC).await;
    chorus_tests::multinode::resend_until_acked(&mut fresh, DOC).await;
    *c = fresh;
    true
}

async fn connections(addr: SocketAddr) -> u64 {
    http::get(addr, "/healthz").await.expect("healthz").json()["connections"]
        .as_u64()
        .expect("connections")
}

/// A long-poller: polls through the balancer until told to stop, applying every answer;
/// failed requests (its node died mid-poll) are simply retried, from the same position.
struct Poller {
    doc: Mutex<yrs::Doc>,
    position: Mutex<Option<Position>>,
    answers: Mutex<(u32, u32, u32)>, // (200, 204, other)
    stop: AtomicBool,
}

async fn poll_loop(lb: SocketAddr, p: Arc<Poller>) {
    while !p.stop.load(Ordering::Relaxed) {
        let after = p
            .position
            .lock()
            .expect("lock")
            .map(|p| format!("&after={p}"))
            .unwrap_or_default();
        let r = http::get(lb, &format!("/v1/docs/{DOC}/updates?wait=1{after}")).await;
        let failed = match r {
            Ok(r) if r.status == 200 => {
                p.answers.lock().expect("lock").0 += 1;
                chorus_tests::sse::apply(&p.doc.lock().expect("lock"), &r.body);
                *p.position.lock().expect("lock") =
                    r.header("x-chorus-position").and_then(|h| h.parse().ok());
                false
            }
            Ok(r) if r.status == 204 => {
                p.answers.lock().expect("lock").1 += 1;
                false
            }
            _ => {
                p.answers.lock().expect("lock").2 += 1;
                true
            }
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await; // retry backoff
        }
    }
}

fn text(doc: &yrs::Doc) -> String {
    doc.get_or_insert_text("t").get_string(&doc.transact())
}

fn assert_exactly_once(who: &str, text: &str, tokens: &[String]) {
    for t in tokens {
        assert_eq!(
            text.matches(t.as_str()).count(),
            1,
            "{who}: {t} must appear exactly once in {text:?}"
        );
    }
}

#[tokio::test]
async fn round_robin_nginx_two_nodes_everyone_converges_and_survives_a_node_kill() {
    let redis = RedisServer::start().await;
    let snapshots = tempfile::tempdir().expect("tempdir");
    let (d1, d2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let url = redis.url();
    let snap = snapshots.path().to_str().expect("utf-8 path");
    let args = ["--redis-url", url.as_str(), "--snapshot-dir", snap];
    let n1 = ServerProcess::spawn(d1.path(), &args).await;
    let n2 = ServerProcess::spawn(d2.path(), &args).await;
    let lb = Nginx::start(&[n1.addr, n2.addr]).await;
    let ws_url = lb.ws_url();

    let mut writers = Vec::new();
    for _ in 0..4 {
        let mut c = NativeClient::connect(&ws_url).await;
        c.subscribe_synced(DOC).await;
        writers.push(c);
    }
    let mut readers = Vec::new();
    for _ in 0..4 {
        let r = SseClient::connect(lb.addr, &format!("/v1/docs/{DOC}/events"), &[]).await;
        assert_eq!(r.status, 200, "SSE through nginx");
        readers.push(r);
    }
    // No stickiness: consecutive clients were spread over both nodes.
    let (c1, c2) = (connections(n1.addr).await, connections(n2.addr).await);
    assert!(c1 >= 2 && c2 >= 2, "round-robin spread: {c1} and {c2}");

    let poller = Arc::new(Poller {
        doc: Mutex::new(yrs::Doc::new()),
        position: Mutex::new(None),
        answers: Mutex::new((0, 0, 0)),
        stop: AtomicBool::new(false),
    });
    let polling = tokio::spawn(poll_loop(lb.addr, poller.clone()));

    let mut tokens = Vec::new();
    for round in 0..3 {
        for (i, c) in writers.iter_mut().enumerate() {
            let t = format!("[w{i}-{round}]");
            assert!(!write_acked(c, &ws_url, &t).await, "no node died yet");
            tokens.push(t);
        }
    }
    for (i, r) in readers.iter_mut().enumerate() {
        r.read_until(&format!("reader {i} has the first rounds"), |t| {
            tokens.iter().all(|k| t.contains(k.as_str()))
        })
        .await;
    }

    // Kill node 1 with SIGKILL: no goodbye to anyone.
    let killed = Instant::now();
    n1.kill9().await;

    // Every writer writes again; the ones that were on node 1 reconnect through nginx.
    let mut moved_writers = 0;
    for (i, c) in writers.iter_mut().enumerate() {
        let t = format!("[w{i}-after-kill]");
        moved_writers += usize::from(write_acked(c, &ws_url, &t).await);
        tokens.push(t);
    }

    // Readers read until they have everything; a stream that ended (its node died) is
    // reopened through nginx with Last-Event-ID, the way EventSource does it.
    let mut moved_readers = 0;
    let mut resumed_after = Vec::new();
    for (i, r) in readers.iter_mut().enumerate() {
        let until = Instant::now() + DEADLINE;
        while !tokens.iter().all(|k| r.text_of_doc().contains(k.as_str())) {
            assert!(Instant::now() < until, "reader {i} never caught up");
            match r
                .next_event(until.saturating_duration_since(Instant::now()))
                .await
            {
                Some(e) => r.apply(&e),
                None if r.ended => {
                    let last = r.last_id.clone().expect("an id before the node died");
                    let reconnect = Instant::now();
                    let mut fresh = SseClient::connect(
                        lb.addr,
                        &format!("/v1/docs/{DOC}/events"),
                        &[("last-event-id", &last)],
                    )
                    .await;
                    assert_eq!(fresh.status, 200, "resumed on the surviving node");
                    let first = fresh.next_event(DEADLINE).await.expect("replay event");
                    assert_eq!(
                        first.name, None,
                        "a replay after Last-Event-ID, not a full state: {first:?}"
                    );
                    resumed_after.push(reconnect.elapsed());
                    fresh.doc = std::mem::take(&mut r.doc);
                    fresh.apply(&first);
                    *r = fresh;
                    moved_readers += 1;
                }
                None => {}
            }
        }
    }
    assert!(
        moved_writers >= 1 && moved_readers >= 1,
        "clients of the killed node had to move: {moved_writers} writers, {moved_readers} readers"
    );
    eprintln!(
        "SSE readers of the killed node resumed through nginx: reconnect to replay event took {:?} ({:?} after the kill in all); {} writers moved",
        resumed_after,
        killed.elapsed(),
        moved_writers
    );

    // Everyone holds the same text, with every acked token exactly once.
    let expected = {
        let mut all: Vec<&mut NativeClient> = writers.iter_mut().collect();
        chorus_tests::multinode::converge(&mut all, DOC, &tokens).await
    };
    for (i, c) in writers.iter_mut().enumerate() {
        assert_exactly_once(&format!("writer {i}"), &c.text(DOC), &tokens);
    }
    for (i, r) in readers.iter_mut().enumerate() {
        r.read_until(&format!("reader {i} converges"), |t| t == expected)
            .await;
        assert_exactly_once(&format!("reader {i}"), &r.text_of_doc(), &tokens);
    }
    chorus_tests::eventually("the long-poller converges", DEADLINE, || async {
        (text(&poller.doc.lock().expect("lock")) == expected).then_some(())
    })
    .await;
    poller.stop.store(true, Ordering::Relaxed);
    polling.await.expect("poller");
    assert_exactly_once(
        "long-poller",
        &text(&poller.doc.lock().expect("lock")),
        &tokens,
    );
    let answers = *poller.answers.lock().expect("lock");
    eprintln!("long-poll answers (200, 204, failed): {answers:?}");
    assert!(answers.0 >= 2, "the poller received updates: {answers:?}");
    assert!(lb.error_log().len() < 1 << 20);
    lb.stop().await;
}

/// POSTs one token through the balancer; returns the position.
async fn post_token(lb: SocketAddr, y: &yrs::Doc, token: &str) -> Position {
    use yrs::{ReadTxn, Text};
    let t = y.get_or_insert_text("t");
    let before = y.transact().state_vector();
    let len = t.len(&y.transact());
    t.insert(&mut y.transact_mut(), len, token);
    let update = y.transact().encode_state_as_update_v1(&before);
    let r = http::post(lb, &format!("/v1/docs/{DOC}/updates"), &update)
        .await
        .expect("POST");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["position"]
        .as_str()
        .expect("position")
        .parse()
        .expect("parse")
}

#[tokio::test]
async fn draining_a_node_with_sigterm_moves_its_event_streams_with_a_going_away_event() {
    let redis = RedisServer::start().await;
    let snapshots = tempfile::tempdir().expect("tempdir");
    let (d1, d2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let url = redis.url();
    let snap = snapshots.path().to_str().expect("utf-8 path");
    let args = ["--redis-url", url.as_str(), "--snapshot-dir", snap];
    let n1 = ServerProcess::spawn(d1.path(), &args).await;
    let n2 = ServerProcess::spawn(d2.path(), &args).await;
    let lb = Nginx::start(&[n1.addr, n2.addr]).await;
    let writer = yrs::Doc::new();
    let mut tokens = vec!["[first]".to_string()];
    post_token(lb.addr, &writer, "[first]").await;

    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut r = SseClient::connect(lb.addr, &format!("/v1/docs/{DOC}/events"), &[]).await;
        r.read_until("the first state", |t| t == "[first]").await;
        readers.push(r);
    }
    assert_eq!(connections(n1.addr).await, 1, "one stream per node");

    let draining = tokio::spawn(n1.terminate());
    // The drained node's reader is told to go away; writes keep succeeding through nginx.
    let mut told = 0;
    for r in readers.iter_mut() {
        if let Some(e) = r.next_event(Duration::from_millis(500)).await {
            assert_eq!(e.name.as_deref(), Some("close"), "{e:?}");
            assert!(e.data.contains("1001"), "{e:?}");
            assert!(r.next_event(DEADLINE).await.is_none() && r.ended);
            told += 1;
        }
    }
    assert_eq!(told, 1, "exactly the drained node's reader got `close`");
    let status = draining.await.expect("join");
    assert!(status.success(), "a drained node exits cleanly: {status:?}");
    for i in 0..3 {
        let t = format!("[after-drain-{i}]");
        post_token(lb.addr, &writer, &t).await;
        tokens.push(t);
    }
    for r in readers.iter_mut() {
        if r.ended {
            let last = r.last_id.clone().expect("id");
            let mut fresh = SseClient::connect(
                lb.addr,
                &format!("/v1/docs/{DOC}/events"),
                &[("last-event-id", &last)],
            )
            .await;
            assert_eq!(fresh.status, 200);
            fresh.doc = std::mem::take(&mut r.doc);
            *r = fresh;
        }
        let expected = text(&writer);
        r.read_until("the moved reader catches up", |t| t == expected)
            .await;
        assert_exactly_once("reader", &r.text_of_doc(), &tokens);
    }
    lb.stop().await;
}
