//! One-way readers end to end on one node: Server-Sent Events (state, live updates, resume by
//! Last-Event-ID, heartbeats, auth, expiry, shutdown) and long-poll (round trips, the wait
//! bound, trimmed and foreign positions, bad input).

use chorus_protocol::Position;
use chorus_tests::sse::{SseClient, SseEvent};
use chorus_tests::{DEADLINE, TestServer, http};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact};

/// A backend writer: edits a local doc and POSTs each change as one update.
struct Writer {
    doc: yrs::Doc,
}

impl Writer {
    fn new() -> Self {
        Writer {
            doc: yrs::Doc::new(),
        }
    }

    async fn append(&self, server: &TestServer, doc: &str, s: &str) -> Position {
        let text = self.doc.get_or_insert_text("t");
        let before = self.doc.transact().state_vector();
        let len = text.len(&self.doc.transact());
        text.insert(&mut self.doc.transact_mut(), len, s);
        let update = self.doc.transact().encode_state_as_update_v1(&before);
        let resp = http::post(server.addr, &format!("/v1/docs/{doc}/updates"), &update)
            .await
            .expect("POST");
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        resp.json()["position"]
            .as_str()
            .expect("position")
            .parse()
            .expect("parse")
    }
}

fn text_of(update: &[u8]) -> String {
    let doc = yrs::Doc::new();
    chorus_tests::sse::apply(&doc, update);
    doc.get_or_insert_text("t").get_string(&doc.transact())
}

async fn next(c: &mut SseClient) -> SseEvent {
    c.next_event(DEADLINE).await.expect("an event in time")
}

#[tokio::test]
async fn first_event_is_the_state_then_live_updates_each_with_its_position_as_id() {
    let server = TestServer::start(|_| {}).await;
    let w = Writer::new();
    let p1 = w.append(&server, "live", "hello").await;

    let mut c = SseClient::connect(server.addr, "/v1/docs/live/events", &[]).await;
    assert_eq!(c.status, 200);
    assert_eq!(c.header("content-type"), Some("text/event-stream"));
    assert_eq!(c.header("cache-control"), Some("no-store"));
    assert_eq!(c.header("x-accel-buffering"), Some("no"));

    let first = next(&mut c).await;
    assert_eq!(first.name.as_deref(), Some("state"), "{first:?}");
    assert_eq!(first.position(), Some(p1));
    assert_eq!(text_of(&first.bytes()), "hello");
    c.apply(&first);

    let p2 = w.append(&server, "live", " world").await;
    let second = next(&mut c).await;
    assert_eq!(second.name, None, "an update is a plain message event");
    assert_eq!(second.position(), Some(p2));
    c.apply(&second);
    assert_eq!(c.text_of_doc(), "hello world");
}

#[tokio::test]
async fn last_event_id_replays_exactly_what_was_missed_and_a_foreign_epoch_gets_full_state() {
    let server = TestServer::start(|_| {}).await;
    let w = Writer::new();
    w.append(&server, "resume", "a").await;
    let mut c = SseClient::connect(server.addr, "/v1/docs/resume/events", &[]).await;
    c.read_until("the first state", |t| t == "a").await;
    let last = c.last_id.clone().expect("an id");
    let kept = c
        .doc
        .transact()
        .encode_state_as_update_v1(&Default::default());
    drop(c);

    w.append(&server, "resume", "b").await;
    let p3 = w.append(&server, "resume", "c").await;

    let mut c = SseClient::connect(
        server.addr,
        "/v1/docs/resume/events",
        &[("last-event-id", &last)],
    )
    .await;
    assert_eq!(c.status, 200);
    chorus_tests::sse::apply(&c.doc, &kept);
    let replay = next(&mut c).await;
    assert_eq!(
        replay.name, None,
        "an exact replay, not a state: {replay:?}"
    );
    assert_eq!(replay.position(), Some(p3));
    c.apply(&replay);
    assert_eq!(c.text_of_doc(), "abc");

    // `?after=` does the same for a first connection; an id of another epoch gets the state.
    let mut foreign = SseClient::connect(
        server.addr,
        &format!(
            "/v1/docs/resume/events?after={}",
            Position::new(p3.epoch + 1, p3.id)
        ),
        &[],
    )
    .await;
    let e = next(&mut foreign).await;
    assert_eq!(e.name.as_deref(), Some("state"));
    assert_eq!(text_of(&e.bytes()), "abc");
}

#[tokio::test]
async fn heartbeats_keep_an_idle_stream_alive_and_bad_ids_are_refused() {
    let server = TestServer::start(|c| c.ping_interval = Duration::from_millis(200)).await;
    let mut c = SseClient::connect(server.addr, "/v1/docs/idle/events", &[]).await;
    next(&mut c).await; // the (empty) state
    let before = c.comments;
    assert!(c.next_event(Duration::from_millis(700)).await.is_none());
    assert!(
        c.comments >= before + 2,
        "comment heartbeats while idle ({} → {})",
        before,
        c.comments
    );

    let bad = SseClient::connect(
        server.addr,
        "/v1/docs/idle/events",
        &[("last-event-id", "yesterday")],
    )
    .await;
    assert_eq!(bad.status, 400);
    let body = bad.body().await;
    assert!(body.contains("bad_position"), "{body}");
}

#[tokio::test]
async fn shutdown_ends_streams_with_going_away() {
    let server = TestServer::start(|_| {}).await;
    let mut c = SseClient::connect(server.addr, "/v1/docs/bye/events", &[]).await;
    next(&mut c).await;
    let stopping = tokio::spawn(server.stop());
    let e = next(&mut c).await;
    assert_eq!(e.name.as_deref(), Some("close"));
    assert!(e.data.contains("1001"), "{e:?}");
    assert!(
        c.next_event(DEADLINE).await.is_none() && c.ended,
        "the stream ends"
    );
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("node stops with an SSE reader attached")
        .expect("join");
}

const SECRET: &str = "sse-secret";

fn token(ttl_secs: u64, docs: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "reader", "exp": now + ttl_secs, "iat": now - 1, "docs": docs}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

#[tokio::test]
async fn streams_need_a_read_grant_and_end_when_the_token_expires() {
    let server = TestServer::start(|c| c.auth_secret = Some(SECRET.into())).await;
    let none = SseClient::connect(server.addr, "/v1/docs/secret/events", &[]).await;
    assert_eq!(none.status, 401);
    let other = token(60, json!([{"doc": "other", "access": "read"}]));
    let forbidden = SseClient::connect(
        server.addr,
        &format!("/v1/docs/secret/events?token={other}"),
        &[],
    )
    .await;
    assert_eq!(forbidden.status, 403);
    let poll = http::get(
        server.addr,
        &format!("/v1/docs/secret/updates?token={other}"),
    )
    .await
    .expect("GET");
    assert_eq!(poll.status, 403);

    let short = token(2, json!([{"doc": "secret", "access": "read"}]));
    let bearer = format!("Bearer {short}");
    let mut c = SseClient::connect(
        server.addr,
        "/v1/docs/secret/events",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(c.status, 200);
    next(&mut c).await;
    let started = Instant::now();
    let e = next(&mut c).await;
    assert_eq!(e.name.as_deref(), Some("close"), "{e:?}");
    assert!(e.data.contains("4101"), "token expiry code: {e:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(c.next_event(DEADLINE).await.is_none() && c.ended);
}

#[tokio::test]
async fn a_long_poll_still_waiting_when_its_token_expires_ends_with_401_at_expiry() {
    let server = TestServer::start(|c| c.auth_secret = Some(SECRET.into())).await;
    let t = token(2, json!([{"doc": "lp", "access": "write"}]));
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 2;
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    text.insert(&mut doc.transact_mut(), 0, "x");
    let update = doc
        .transact()
        .encode_state_as_update_v1(&Default::default());
    let posted = http::post(
        server.addr,
        &format!("/v1/docs/lp/updates?token={t}"),
        &update,
    )
    .await
    .expect("POST");
    assert_eq!(posted.status, 200);
    let at: Position = posted.json()["position"]
        .as_str()
        .expect("position")
        .parse()
        .expect("parse");
    // Nothing will follow `at`: the poll waits, and its token runs out long before `wait`.
    let r = http::get(
        server.addr,
        &format!("/v1/docs/lp/updates?token={t}&after={at}&wait=25"),
    )
    .await
    .expect("GET");
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "token_expired");
    let late = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(exp))
        .unwrap_or_default();
    assert!(
        late <= Duration::from_secs(1),
        "ended {late:?} after expiry"
    );
}

#[tokio::test]
async fn revoking_the_token_ends_its_streams() {
    let server = TestServer::start(|c| {
        c.auth_secret = Some(SECRET.into());
        c.admin_key = Some("admin".into());
    })
    .await;
    let t = token(600, json!([{"doc": "*", "access": "read"}]));
    let mut c =
        SseClient::connect(server.addr, &format!("/v1/docs/rv/events?token={t}"), &[]).await;
    assert_eq!(c.status, 200);
    next(&mut c).await;
    let r = http::request(
        server.addr,
        "POST",
        "/v1/admin/revoke",
        &[
            ("authorization", "Bearer admin"),
            ("content-type", "application/json"),
        ],
        br#"{"sub":"reader"}"#,
    )
    .await
    .expect("revoke");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["closed"], 1, "the stream is found as a holder");
    let e = next(&mut c).await;
    assert_eq!(e.name.as_deref(), Some("close"));
    assert!(e.data.contains("4103"), "{e:?}");
    assert!(c.next_event(DEADLINE).await.is_none() && c.ended);
    let again =
        SseClient::connect(server.addr, &format!("/v1/docs/rv/events?token={t}"), &[]).await;
    assert_eq!(
        again.status, 401,
        "a revoked token cannot reopen the stream"
    );
}

async fn poll(server: &TestServer, query: &str) -> http::Response {
    http::get(server.addr, &format!("/v1/docs/lp/updates{query}"))
        .await
        .expect("GET")
}

fn position_of(r: &http::Response) -> Position {
    r.header("x-chorus-position")
        .expect("x-chorus-position")
        .parse()
        .expect("position")
}

#[tokio::test]
async fn long_poll_round_trips_waits_within_the_bound_and_wakes_on_an_update() {
    let server = TestServer::start(|_| {}).await;
    let w = Writer::new();
    let p1 = w.append(&server, "lp", "one").await;

    let first = poll(&server, "?wait=5").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-chorus-sync"), Some("full"));
    assert_eq!(first.header("cache-control"), Some("no-store"));
    assert_eq!(position_of(&first), p1);
    let reader = yrs::Doc::new();
    chorus_tests::sse::apply(&reader, &first.body);

    let p2 = w.append(&server, "lp", " two").await;
    let p3 = w.append(&server, "lp", " three").await;
    let started = Instant::now();
    let next = poll(&server, &format!("?after={p1}&wait=5")).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answers at once when there is something"
    );
    assert_eq!(next.status, 200);
    assert_eq!(next.header("x-chorus-sync"), Some("replay"));
    assert_eq!(position_of(&next), p3, "one merged update up to the newest");
    assert!(p2.id < p3.id);
    chorus_tests::sse::apply(&reader, &next.body);
    assert_eq!(
        reader
            .get_or_insert_text("t")
            .get_string(&reader.transact()),
        "one two three"
    );

    // Nothing new: waits the bound, then an empty answer with the same position.
    let started = Instant::now();
    let empty = poll(&server, &format!("?after={p3}&wait=0.5")).await;
    let took = started.elapsed();
    assert_eq!(empty.status, 204);
    assert!(empty.body.is_empty());
    assert_eq!(position_of(&empty), p3);
    assert_eq!(empty.header("cache-control"), Some("no-store"));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "waited about the bound: {took:?}"
    );

    // A waiting poll is woken by the next update.
    let addr = server.addr;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = http::get(addr, &format!("/v1/docs/lp/updates?after={p3}&wait=20"))
            .await
            .expect("GET");
        (r, started.elapsed())
    });
    // The poll is parked once the node has a subscriber for it; the write follows.
    chorus_tests::eventually("the poll is parked", DEADLINE, || async {
        let s = http::get(addr, "/healthz").await.ok()?;
        (s.json()["connections"].as_u64()? >= 1).then_some(())
    })
    .await;
    let p4 = w.append(&server, "lp", " four").await;
    let (r, took) = waiting.await.expect("join");
    assert_eq!(r.status, 200);
    assert_eq!(position_of(&r), p4);
    assert!(
        took < Duration::from_secs(10),
        "woken, not timed out: {took:?}"
    );
    chorus_tests::sse::apply(&reader, &r.body);
    assert_eq!(
        reader
            .get_or_insert_text("t")
            .get_string(&reader.transact()),
        "one two three four"
    );
}

#[tokio::test]
async fn long_poll_from_a_trimmed_or_foreign_position_answers_the_full_state_and_says_so() {
    // A tiny replay memory: old positions fall out of the replayable window quickly.
    let server = TestServer::start(|c| c.replay_memory_bytes = 64).await;
    let w = Writer::new();
    let first = w.append(&server, "lp", "x").await;
    for i in 0..20 {
        w.append(&server, "lp", &format!("{i}")).await;
    }
    let r = poll(&server, &format!("?after={first}&wait=1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-chorus-sync"), Some("full"), "trimmed position");
    let expected = w.doc.get_or_insert_text("t").get_string(&w.doc.transact());
    assert_eq!(text_of(&r.body), expected);

    let foreign = Position::new(first.epoch + 7, first.id);
    let r = poll(&server, &format!("?after={foreign}&wait=1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-chorus-sync"), Some("full"), "foreign epoch");
    assert_eq!(text_of(&r.body), expected);
}

#[tokio::test]
async fn long_poll_rejects_bad_positions_and_waits_with_typed_errors() {
    let server = TestServer::start(|_| {}).await;
    for (query, code) in [
        ("?after=12", "bad_position"),
        ("?after=1.2-x", "bad_position"),
        ("?wait=-1", "bad_wait"),
        ("?wait=soon", "bad_wait"),
    ] {
        let r = poll(&server, query).await;
        assert_eq!(r.status, 400, "{query}");
        assert_eq!(r.json()["error"], code, "{query}");
    }
    // An over-long wait is capped, not refused (the cap is documented: 30 s).
    let r = poll(&server, "?wait=3600").await;
    assert_eq!(r.status, 200, "no position: the state at once");
    let _ = yrs::Update::decode_v1(&r.body).expect("a v1 update");
}

#[tokio::test]
async fn readers_that_vanish_release_their_subscription_so_the_document_can_unload() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.evict_after = Duration::from_millis(200);
    })
    .await;
    let health = |addr| async move { http::get(addr, "/healthz").await.expect("healthz").json() };
    // Written once, so a poll from its head parks (a poll on a document nobody wrote answers
    // at once: there is no log to wait on).
    let at = Writer::new().append(&server, "gone", "x").await.to_string();
    // A parked long-poll and an event stream whose clients hang up without reading.
    for path in [
        format!("/v1/docs/gone/updates?after={at}&wait=1"),
        "/v1/docs/gone/events".to_string(),
    ] {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        chorus_tests::eventually(
            "the reader is admitted and subscribed",
            DEADLINE,
            || async { (health(server.addr).await["connections"] == 1).then_some(()) },
        )
        .await;
        drop(s);
        chorus_tests::eventually(
            &format!("{path}: the vanished reader's document unloads"),
            DEADLINE,
            || async {
                let h = health(server.addr).await;
                (h["hot_documents"] == 0 && h["connections"] == 0).then_some(())
            },
        )
        .await;
    }
}

/// Long-polls from a position that cannot exist yet (far in the future of the document's
/// epoch) are answered at once, without waiting for it, and leave nothing behind that keeps
/// the document loaded.
#[tokio::test]
async fn far_future_long_polls_are_answered_at_once_and_do_not_pin_the_document() {
    let server = TestServer::start(|c| {
        c.evict_after = Duration::from_millis(200);
        c.max_connections_per_second = 100_000;
        c.max_api_requests_per_second = 100_000;
    })
    .await;
    let at = Writer::new().append(&server, "future", "x").await;
    let far = format!("{}.18446744073709551615-0", at.epoch);
    for _ in 0..20 {
        let polls = (0..50).map(|_| {
            let path = format!("/v1/docs/future/updates?after={far}&wait=0");
            async move { http::get(server.addr, &path).await.expect("poll") }
        });
        for r in futures_util::future::join_all(polls).await {
            assert_eq!(r.status, 200);
        }
    }
    chorus_tests::eventually(
        "the document unloads after its last reader",
        DEADLINE,
        || async {
            let h = http::get(server.addr, "/healthz")
                .await
                .expect("healthz")
                .json();
            (h["hot_documents"] == 0).then_some(())
        },
    )
    .await;
}
