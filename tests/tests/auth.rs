//! Auth end to end: tokens checked before the upgrade, per-document grants on a multiplexed
//! socket, read-only, refresh and expiry, revocation, and the HTTP API.

use chorus_protocol::{ClientFrame, ErrorCode, ServerFrame};
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::{DEADLINE, TestServer, eventually, http};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret";
const ADMIN: &str = "admin-key";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token_with(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

fn token(sub: &str, ttl: u64, docs: Value) -> String {
    token_with(
        json!({"sub": sub, "exp": now() + ttl, "iat": now() - 1, "docs": docs}),
        SECRET,
    )
}

fn writer_of_all() -> String {
    token("backend", 600, json!([{"doc": "*", "access": "write"}]))
}

async fn server() -> TestServer {
    TestServer::start(|c| {
        c.auth_secret = Some(SECRET.into());
        c.admin_key = Some(ADMIN.into());
        c.token_warning = Duration::from_secs(1);
    })
    .await
}

async fn upgrade_status(url: &str) -> Option<u16> {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Some(resp.status().as_u16()),
        Ok(_) => None,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn bad_tokens_get_401_and_insufficient_ones_403_never_a_socket() {
    let server = server().await;
    let ws = server.ws_url();
    assert_eq!(upgrade_status(&ws).await, Some(401), "no token");
    let expired = token_with(json!({"sub": "a", "exp": now() - 5}), SECRET);
    assert_eq!(
        upgrade_status(&format!("{ws}?token={expired}")).await,
        Some(401),
        "expired"
    );
    let mut tampered = token("a", 60, json!([]));
    tampered.insert(tampered.len() - 5, 'A');
    assert_eq!(
        upgrade_status(&format!("{ws}?token={tampered}")).await,
        Some(401),
        "tampered"
    );
    let wrong_key = token_with(json!({"sub": "a", "exp": now() + 60}), "other-secret");
    assert_eq!(
        upgrade_status(&format!("{ws}?token={wrong_key}")).await,
        Some(401),
        "wrong key"
    );
    let other_doc = token("a", 60, json!([{"doc": "other", "access": "write"}]));
    assert_eq!(
        upgrade_status(&format!("{}/mine?token={other_doc}", server.yjs_base())).await,
        Some(403),
        "y-websocket for a document the token does not grant"
    );
    // The reason is in the body.
    let r = http::get(server.addr, "/v1/docs/x").await.expect("GET");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "bad_token");
    let r = http::get(server.addr, &format!("/v1/docs/x?token={expired}"))
        .await
        .expect("GET");
    assert_eq!(r.json()["error"], "token_expired");
    let health = http::get(server.addr, "/healthz")
        .await
        .expect("GET")
        .json();
    assert_eq!(health["auth"], "on");
}

#[tokio::test]
async fn a_denied_document_fails_alone_and_read_grants_never_write() {
    let server = server().await;
    let t = token(
        "ann",
        600,
        json!([{"doc": "mine", "access": "write"}, {"doc": "shared-*", "access": "read"}]),
    );
    let mut c = NativeClient::connect(&format!("{}?token={t}", server.ws_url())).await;
    c.subscribe_synced("mine").await;
    c.subscribe_from("secret", None, None).await;
    let e = c
        .wait_for(|f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::Forbidden,
                    ..
                }
            )
        })
        .await;
    assert!(matches!(e, ServerFrame::Error { doc: Some(ref d), .. } if d == "secret"));
    // The rest of the socket keeps working.
    let s = c.insert("mine", 0, "ok").await;
    c.wait_acked(s).await;

    // Read-only: subscribe and receive, never write.
    let backend = writer_of_all();
    let mut w = NativeClient::connect(&format!("{}?token={backend}", server.ws_url())).await;
    w.subscribe_synced("shared-1").await;
    let s = w.insert("shared-1", 0, "from backend").await;
    w.wait_acked(s).await;
    c.subscribe_synced("shared-1").await;
    assert_eq!(c.text("shared-1"), "from backend");
    let before = http::get(server.addr, &format!("/v1/docs/shared-1?token={backend}"))
        .await
        .expect("GET")
        .body;
    for _ in 0..5 {
        c.insert("shared-1", 0, "vandal").await;
    }
    c.wait_for(|f| {
        matches!(
            f,
            ServerFrame::Error {
                code: ErrorCode::ReadOnly,
                ..
            }
        )
    })
    .await;
    let _ = w.drain_for(Duration::from_millis(200)).await;
    assert_eq!(
        w.text("shared-1"),
        "from backend",
        "nothing reached the other client"
    );
    let after = http::get(server.addr, &format!("/v1/docs/shared-1?token={backend}"))
        .await
        .expect("GET")
        .body;
    assert_eq!(before, after, "nothing reached the document");
    let stats = http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json();
    assert!(stats["refused_writes"].as_u64() >= Some(5), "{stats}");

    // The HTTP API honours the same grants.
    let update = vec![0, 0];
    let r = http::post(
        server.addr,
        &format!("/v1/docs/shared-1/updates?token={t}"),
        &update,
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 403, "read grant cannot POST");
    // The state, the document as JSON and the inspector: a read grant of that document (the
    // inspector also takes the admin key, below).
    for path in ["", "/json", "/inspect"] {
        for (doc, token, status) in [
            ("shared-1", Some(&t), 200),
            ("secret", Some(&t), 403),
            ("secret", None, 401),
        ] {
            let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
            let r = http::get(server.addr, &format!("/v1/docs/{doc}{path}{query}"))
                .await
                .expect("GET");
            assert_eq!(r.status, status, "GET {doc}{path} with token {token:?}");
        }
    }
    let bearer = format!("Bearer {ADMIN}");
    // The admin key inspects any document, but is no token for the rest of the document API.
    for (path, status) in [("inspect", 200), ("json", 401)] {
        let r = http::request(
            server.addr,
            "GET",
            &format!("/v1/docs/secret/{path}"),
            &[("authorization", &bearer)],
            &[],
        )
        .await
        .expect("GET");
        assert_eq!(r.status, status, "{path} with the admin key");
    }
}

#[tokio::test]
async fn refresh_keeps_the_socket_and_expiry_closes_it_within_a_second() {
    let server = server().await;
    let docs = json!([{"doc": "*", "access": "write"}]);
    // This one refreshes when warned.
    let short = token("kim", 3, docs.clone());
    let mut r = NativeClient::connect(&format!("{}?token={short}", server.ws_url())).await;
    r.subscribe_synced("d").await;
    let warned = r
        .wait_for(|f| matches!(f, ServerFrame::AuthExpiring { .. }))
        .await;
    let ServerFrame::AuthExpiring { expires_at } = warned else {
        unreachable!()
    };
    r.send(&ClientFrame::Auth {
        token: token("kim", 600, docs.clone()),
    })
    .await;
    // Past the old expiry (plus the 1 s allowance) the socket is still open and working.
    let until = UNIX_EPOCH + Duration::from_secs(expires_at) + Duration::from_millis(1500);
    let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
    for e in r.drain_for(wait).await {
        assert!(
            !matches!(e, Event::Closed(_)),
            "a refreshed socket was closed: {e:?}"
        );
    }
    let s = r.insert("d", 0, "still here").await;
    r.wait_acked(s).await;

    // This one does not refresh: closed with 4101 within a second of expiry.
    let exp = now() + 2;
    let t = token_with(json!({"sub": "lee", "exp": exp, "docs": docs}), SECRET);
    let mut x = NativeClient::connect(&format!("{}?token={t}", server.ws_url())).await;
    x.subscribe_synced("d").await;
    assert_eq!(x.wait_closed().await, Some(4101));
    let late = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(exp))
        .unwrap_or_default();
    assert!(
        late <= Duration::from_secs(1),
        "closed {late:?} after expiry"
    );
    eprintln!("token expiry to close: {late:?}");
}

#[tokio::test]
async fn a_y_websocket_socket_is_closed_with_4101_when_its_token_expires() {
    let server = server().await;
    let exp = now() + 2;
    let docs = json!([{"doc": "page", "access": "write"}]);
    let t = token_with(json!({"sub": "ann", "exp": exp, "docs": docs}), SECRET);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/page?token={t}", server.yjs_base()))
            .await
            .expect("connect");
    let until = tokio::time::Instant::now() + DEADLINE;
    let code = loop {
        match tokio::time::timeout_at(until, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(4101));
    let late = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(exp))
        .unwrap_or_default();
    assert!(
        late <= Duration::from_secs(1),
        "closed {late:?} after expiry"
    );
}

#[tokio::test]
async fn revocation_closes_the_subjects_sockets_within_a_second() {
    let server = server().await;
    let t = token("eve", 600, json!([{"doc": "*", "access": "write"}]));
    let mut eve = NativeClient::connect(&format!("{}?token={t}", server.ws_url())).await;
    eve.subscribe_synced("d").await;
    let other = writer_of_all();
    let mut bystander = NativeClient::connect(&format!("{}?token={other}", server.ws_url())).await;
    bystander.subscribe_synced("d").await;

    let denied = http::request(
        server.addr,
        "POST",
        "/v1/admin/revoke",
        &[("content-type", "application/json")],
        br#"{"sub":"eve"}"#,
    )
    .await
    .expect("POST");
    assert_eq!(denied.status, 401, "the admin API needs its key");
    let started = std::time::Instant::now();
    let r = http::request(
        server.addr,
        "POST",
        "/v1/admin/revoke",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {ADMIN}")),
        ],
        br#"{"sub":"eve"}"#,
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["closed"], 1);
    assert_eq!(eve.wait_closed().await, Some(4103));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "revocation to close took {took:?}"
    );
    eprintln!("revocation to close: {took:?}");
    let url = format!("{}?token={t}", server.ws_url());
    assert_eq!(
        upgrade_status(&url).await,
        Some(401),
        "the revoked token cannot reconnect"
    );
    // Everyone else is untouched.
    let s = bystander.insert("d", 0, "fine").await;
    bystander.wait_acked(s).await;
}

#[tokio::test]
async fn read_only_y_websocket_writes_never_reach_the_document() {
    let server = server().await;
    let reader = token("viewer", 600, json!([{"doc": "page", "access": "read"}]));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/page?token={reader}", server.yjs_base()))
            .await
            .expect("a read grant may connect");
    // A real update: insert "x" into text "t".
    let doc = yrs::Doc::new();
    let update = {
        use yrs::{ReadTxn, Text, Transact};
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "x");
        doc.transact()
            .encode_state_as_update_v1(&Default::default())
    };
    let mut msg = vec![0, 2, update.len() as u8];
    msg.extend_from_slice(&update);
    ws.send(Message::Binary(msg.into())).await.expect("send");
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let m = tokio::time::timeout_at(until, ws.next())
            .await
            .expect("permission denied in time");
        if let Some(Ok(Message::Binary(b))) = m
            && b.first() == Some(&2)
        {
            assert_eq!(b.get(1), Some(&0), "y-protocols permission denied");
            break;
        }
    }
    let backend = writer_of_all();
    let state = http::get(server.addr, &format!("/v1/docs/page?token={backend}"))
        .await
        .expect("GET");
    assert_eq!(
        state.body,
        vec![0, 0],
        "the read-only update was never applied"
    );
}

#[tokio::test]
async fn revocation_reaches_every_node_through_redis_and_nodes_started_later() {
    let redis = chorus_tests::redis::RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let tune = |c: &mut chorus_server::Config| {
        c.auth_secret = Some(SECRET.into());
        c.admin_key = Some(ADMIN.into());
    };
    let nodes = chorus_tests::multinode::start_nodes(&redis.url(), snaps.path(), 2, tune).await;
    let t = token("mal", 600, json!([{"doc": "*", "access": "write"}]));
    let mut on_first = NativeClient::connect(&format!("{}?token={t}", nodes[0].ws_url())).await;
    let mut on_second = NativeClient::connect(&format!("{}?token={t}", nodes[1].ws_url())).await;
    on_first.subscribe_synced("d").await;
    on_second.subscribe_synced("d").await;
    let other = writer_of_all();
    let mut bystander =
        NativeClient::connect(&format!("{}?token={other}", nodes[1].ws_url())).await;
    bystander.subscribe_synced("d").await;

    // Revoked through the first node; the socket on the second closes too.
    let started = std::time::Instant::now();
    let r = http::request(
        nodes[0].addr,
        "POST",
        "/v1/admin/revoke",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {ADMIN}")),
        ],
        br#"{"sub":"mal"}"#,
    )
    .await
    .expect("POST");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["propagated"], true);
    assert_eq!(on_second.wait_closed().await, Some(4103));
    let took = started.elapsed();
    assert_eq!(on_first.wait_closed().await, Some(4103));
    assert!(
        took < Duration::from_secs(1),
        "revocation to close on another node took {took:?}"
    );
    eprintln!("revocation to close on another node (via Redis): {took:?}");
    for n in &nodes {
        let url = format!("{}?token={t}", n.ws_url());
        assert_eq!(upgrade_status(&url).await, Some(401), "refused everywhere");
    }
    // A node that starts after the revocation learns it from the stream.
    let late = chorus_tests::multinode::start_nodes(&redis.url(), snaps.path(), 1, tune).await;
    let url = format!("{}?token={t}", late[0].ws_url());
    eventually("the new node refuses the revoked token", DEADLINE, || {
        let url = url.clone();
        async move { (upgrade_status(&url).await == Some(401)).then_some(()) }
    })
    .await;
    let s = bystander.insert("d", 0, "unaffected").await;
    bystander.wait_acked(s).await;
}

async fn revoke_subject(addr: std::net::SocketAddr, sub: &str) {
    let body = json!({ "sub": sub }).to_string();
    let r = http::request(
        addr,
        "POST",
        "/v1/admin/revoke",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {ADMIN}")),
        ],
        body.as_bytes(),
    )
    .await
    .expect("POST revoke");
    assert_eq!(r.status, 200, "revoke: {:?}", r.json());
}

async fn stats(addr: std::net::SocketAddr) -> Value {
    http::get(addr, "/v1/stats").await.expect("stats").json()
}

/// Whether the document's state (as the server holds it) has `needle` in its text.
async fn stored_text(addr: std::net::SocketAddr, doc: &str) -> String {
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Transact};
    let backend = writer_of_all();
    // An empty update through the log first: it is applied after anything appended before it,
    // so the state read next includes every earlier append.
    let marker = http::post(
        addr,
        &format!("/v1/docs/{doc}/updates?token={backend}"),
        &[0, 0],
    )
    .await
    .expect("POST marker");
    assert_eq!(marker.status, 200);
    let state = http::get(addr, &format!("/v1/docs/{doc}?token={backend}"))
        .await
        .expect("GET");
    let d = yrs::Doc::new();
    let text = d.get_or_insert_text("t");
    d.transact_mut()
        .apply_update(yrs::Update::decode_v1(&state.body).expect("decode"))
        .expect("apply");
    text.get_string(&d.transact())
}

/// Revocation stops writes at once, not when the socket's writer gets unstuck: here the writer
/// is blocked on a client that stopped reading while a large document is pushed to it, and the
/// update the client sends after its revocation never reaches the document.
#[tokio::test]
async fn a_revoked_socket_whose_writer_is_stuck_gets_no_further_update_in() {
    let server = TestServer::start(|c| {
        c.auth_secret = Some(SECRET.into());
        c.admin_key = Some(ADMIN.into());
        c.max_messages_per_second = 1_000_000;
        c.ping_interval = Duration::from_secs(120);
        c.slow_client_timeout = Duration::from_secs(2);
    })
    .await;
    let t = token("eve", 600, json!([{"doc": "*", "access": "write"}]));
    let mut eve =
        NativeClient::connect_small_window(&format!("{}?token={t}", server.ws_url()), 16 * 1024)
            .await;
    eve.subscribe_synced("stuck").await;
    // A backend pushes a growing document that eve does not read, until her writer is stuck
    // (a few MB: what the socket buffers hold).
    let url = format!("{}?token={}", server.ws_url(), writer_of_all());
    let stuck = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let push = tokio::spawn({
        let stuck = stuck.clone();
        async move {
            let mut w = NativeClient::connect(&url).await;
            w.subscribe_synced("stuck").await;
            let value = "v".repeat(100 * 1024);
            let mut last = 0;
            for i in 0..400 {
                if stuck.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                last = w.set_map("stuck", &format!("k{i}"), &value).await;
                let _ = w.drain_for(Duration::ZERO).await;
            }
            w.wait_acked(last).await;
            w.close().await;
        }
    });
    eventually("eve's writer is stuck", DEADLINE * 2, || async {
        (stats(server.addr).await["outbox"]["stalled"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    stuck.store(true, std::sync::atomic::Ordering::Relaxed);
    revoke_subject(server.addr, "eve").await;
    eve.insert("stuck", 0, "after revocation").await;
    push.await.expect("pusher");
    // Everything eve's socket would ever append has been appended once the server let go of it.
    eventually("the server released eve's socket", DEADLINE, || async {
        (stats(server.addr).await["connections"].as_u64() == Some(0)).then_some(())
    })
    .await;
    let text = stored_text(server.addr, "stuck").await;
    assert!(
        !text.contains("after revocation"),
        "an update sent after the revocation was appended"
    );
}

/// The write path checks the token again right before the append: an update that was waiting
/// for its dependencies when the token was revoked is refused when they arrive.
#[tokio::test]
async fn an_update_waiting_when_its_token_is_revoked_is_refused() {
    let server = TestServer::start(|c| {
        c.auth_secret = Some(SECRET.into());
        c.admin_key = Some(ADMIN.into());
        c.missing_deps_wait = Duration::from_secs(10);
    })
    .await;
    let t = token("eve", 600, json!([{"doc": "*", "access": "write"}]));
    let mut eve = NativeClient::connect(&format!("{}?token={t}", server.ws_url())).await;
    eve.subscribe_synced("deps").await;
    let (base, tail) = {
        use yrs::{ReadTxn, Text, Transact};
        let d = yrs::Doc::with_client_id(4242);
        let text = d.get_or_insert_text("t");
        text.insert(&mut d.transact_mut(), 0, "base");
        let base = d.transact().encode_state_as_update_v1(&Default::default());
        let sv = d.transact().state_vector();
        text.insert(&mut d.transact_mut(), 4, "tail");
        (base, d.transact().encode_state_as_update_v1(&sv))
    };
    // `tail` builds on `base`, which the document does not have yet: it waits.
    eve.send_update("deps", tail).await;
    revoke_subject(server.addr, "eve").await;
    let r = http::post(
        server.addr,
        &format!("/v1/docs/deps/updates?token={}", writer_of_all()),
        &base,
    )
    .await
    .expect("POST base");
    assert_eq!(r.status, 200);
    assert_eq!(eve.wait_closed().await, Some(4103));
    eventually("the server released eve's socket", DEADLINE, || async {
        (stats(server.addr).await["connections"].as_u64() == Some(0)).then_some(())
    })
    .await;
    assert_eq!(stored_text(server.addr, "deps").await, "base");
}

/// A long-poll is registered under its token like a socket: a revocation ends it at once with
/// 401 `token_revoked`, instead of letting it wait out `wait=` and answer.
#[tokio::test]
async fn a_long_poll_is_ended_by_revocation() {
    let server = server().await;
    let backend = writer_of_all();
    let update = {
        use yrs::{ReadTxn, Text, Transact};
        let d = yrs::Doc::new();
        d.get_or_insert_text("t")
            .insert(&mut d.transact_mut(), 0, "x");
        d.transact().encode_state_as_update_v1(&Default::default())
    };
    let r = http::post(
        server.addr,
        &format!("/v1/docs/lp/updates?token={backend}"),
        &update,
    )
    .await
    .expect("POST");
    let position = r.json()["position"].as_str().expect("position").to_owned();
    let t = token("pat", 600, json!([{"doc": "lp", "access": "read"}]));
    let addr = server.addr;
    let poll = tokio::spawn(async move {
        http::get(
            addr,
            &format!("/v1/docs/lp/updates?after={position}&wait=30&token={t}"),
        )
        .await
        .expect("long-poll")
    });
    eventually("the long-poll is waiting", DEADLINE, || async {
        (stats(addr).await["connections"].as_u64() == Some(1)).then_some(())
    })
    .await;
    revoke_subject(addr, "pat").await;
    let answer = tokio::time::timeout(DEADLINE, poll)
        .await
        .expect("the poll ended well before its 30 s wait")
        .expect("poll task");
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"], "token_revoked");
}

/// A node with Redis reads every revocation already recorded before it serves anyone: its very
/// first answer to a token revoked earlier is 401, however long the revocation stream is.
#[tokio::test]
async fn a_fresh_node_refuses_a_token_revoked_before_it_started() {
    let redis = chorus_tests::redis::RedisServer::start().await;
    // Thousands of older revocations ahead of this one: several reads to get through.
    let script = "for i = 1, 5000 do redis.call('XADD', KEYS[1], '*', 't', ARGV[1], 'j', 'old-' .. i, 'x', ARGV[2]) end \
                  return redis.call('XADD', KEYS[1], '*', 't', ARGV[1], 's', 'mal')";
    let at = now().to_string();
    let until = (now() + 3600).to_string();
    redis
        .cli(&["EVAL", script, "1", "chorus:revocations", &at, &until])
        .await;
    let t = token("mal", 600, json!([{"doc": "*", "access": "write"}]));
    let node = TestServer::start(|c| {
        c.auth_secret = Some(SECRET.into());
        c.redis_url = vec![redis.url()];
    })
    .await;
    assert_eq!(
        upgrade_status(&format!("{}?token={t}", node.ws_url())).await,
        Some(401),
        "the first request already knows the revocation"
    );
    let r = http::get(node.addr, &format!("/v1/docs/d?token={t}"))
        .await
        .expect("GET");
    assert_eq!(r.json()["error"], "token_revoked");
}
