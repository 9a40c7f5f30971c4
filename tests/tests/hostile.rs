//! Hostile clients (reliability.md §5 battery): awareness spoofing, and the other rows that
//! need a socket that misbehaves on purpose. Each test also checks that bystanders keep working.

use chorus_protocol::{ClientFrame, ErrorCode, ServerFrame};
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::{DEADLINE, TestServer, http};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

/// An awareness update setting `entries` (client id, clock, JSON state; `null` removes).
fn awareness(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    AwarenessUpdate {
        clients: entries
            .iter()
            .map(|&(id, clock, json)| {
                (
                    yrs::ClientID::new(id),
                    AwarenessUpdateEntry {
                        clock,
                        json: json.into(),
                    },
                )
            })
            .collect(),
    }
    .encode_v1()
}

async fn send_awareness(c: &mut NativeClient, doc: &str, entries: &[(u64, u32, &str)]) {
    c.send(&ClientFrame::Awareness {
        doc: doc.into(),
        update: awareness(entries),
    })
    .await;
}

/// What `watcher` has seen of each awareness client id, newest last.
#[derive(Default)]
struct Presence(HashMap<u64, String>);

impl Presence {
    fn absorb(&mut self, events: &[Event]) {
        for e in events {
            if let Event::Frame(ServerFrame::Awareness { update, .. }) = e {
                let u = AwarenessUpdate::decode_v1(update).expect("awareness decodes");
                for (id, entry) in u.clients {
                    self.0.insert(id.get(), entry.json.to_string());
                }
            }
        }
    }

    /// Reads until client `id` shows `json`.
    async fn wait(&mut self, c: &mut NativeClient, id: u64, json: &str) {
        let until = tokio::time::Instant::now() + DEADLINE;
        while self.0.get(&id).map(String::as_str) != Some(json) {
            assert!(
                tokio::time::Instant::now() < until,
                "client {id} never showed {json}; have {:?}",
                self.0
            );
            let e = c.drain_for(Duration::from_millis(20)).await;
            self.absorb(&e);
        }
    }
}

#[tokio::test]
async fn a_connection_cannot_set_or_remove_another_connections_awareness() {
    let server = TestServer::start(|_| {}).await;
    let doc = "presence";
    let mut alice = NativeClient::connect(&server.ws_url()).await;
    let mut mallory = NativeClient::connect(&server.ws_url()).await;
    let mut watcher = NativeClient::connect(&server.ws_url()).await;
    for c in [&mut alice, &mut mallory, &mut watcher] {
        c.subscribe_synced(doc).await;
    }
    let mut seen = Presence::default();
    send_awareness(&mut alice, doc, &[(111, 1, r#"{"name":"alice"}"#)]).await;
    seen.wait(&mut watcher, 111, r#"{"name":"alice"}"#).await;

    // Overwrite, a multi-entry update carrying a foreign id, and a removal: all refused whole.
    let attacks: [&[(u64, u32, &str)]; 3] = [
        &[(111, 9, r#"{"name":"mallory"}"#)],
        &[(222, 1, r#"{"name":"m"}"#), (111, 10, r#"{"name":"x"}"#)],
        &[(111, 11, "null")],
    ];
    for attack in attacks {
        send_awareness(&mut mallory, doc, attack).await;
        mallory
            .wait_for(|f| {
                matches!(f, ServerFrame::Error { code: ErrorCode::AwarenessNotOwned, doc: Some(d), .. } if d == "presence")
            })
            .await;
    }
    // Her own id works; nothing of the attacks reached the watcher.
    send_awareness(&mut mallory, doc, &[(222, 2, r#"{"name":"mallory"}"#)]).await;
    seen.wait(&mut watcher, 222, r#"{"name":"mallory"}"#).await;
    assert_eq!(
        seen.0[&111], r#"{"name":"alice"}"#,
        "alice's state untouched"
    );

    // A socket cannot hoard ids either.
    let many: Vec<(u64, u32, &str)> = (1000..1010).map(|id| (id, 1, "{}")).collect();
    send_awareness(&mut mallory, doc, &many).await;
    mallory
        .wait_for(|f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::AwarenessNotOwned,
                    ..
                }
            )
        })
        .await;

    // On disconnect only the leaver's own ids are cleared.
    mallory.close().await;
    seen.wait(&mut watcher, 222, "null").await;
    assert_eq!(seen.0[&111], r#"{"name":"alice"}"#);
    assert!(!seen.0.contains_key(&1000), "hoarded ids never appeared");
    let stats = http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json();
    assert_eq!(stats["refused_awareness"], 4);

    // Once alice leaves, her id is free for whoever comes next (a reconnecting alice).
    alice.close().await;
    seen.wait(&mut watcher, 111, "null").await;
    let mut alice_again = NativeClient::connect(&server.ws_url()).await;
    alice_again.subscribe_synced(doc).await;
    send_awareness(&mut alice_again, doc, &[(111, 20, r#"{"name":"alice"}"#)]).await;
    seen.wait(&mut watcher, 111, r#"{"name":"alice"}"#).await;
}

#[tokio::test]
async fn y_websocket_clients_cannot_spoof_awareness_either() {
    let server = TestServer::start(|_| {}).await;
    let mut watcher = NativeClient::connect(&server.ws_url()).await;
    watcher.subscribe_synced("yaw").await;
    let mut owner = NativeClient::connect(&server.ws_url()).await;
    owner.subscribe_synced("yaw").await;
    let mut seen = Presence::default();
    send_awareness(&mut owner, "yaw", &[(5, 1, r#"{"n":"owner"}"#)]).await;
    seen.wait(&mut watcher, 5, r#"{"n":"owner"}"#).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/yaw", server.yjs_base()))
        .await
        .expect("connect");
    let spoof = |entries: &[(u64, u32, &str)]| {
        // y-websocket: messageAwareness (1), then the update as a length-prefixed buffer.
        let u = awareness(entries);
        let mut m = vec![1u8];
        let mut n = u.len();
        while n >= 0x80 {
            m.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        m.push(n as u8);
        m.extend(u);
        Message::Binary(m.into())
    };
    ws.send(spoof(&[(5, 50, r#"{"n":"spoofed"}"#)]))
        .await
        .expect("send");
    ws.send(spoof(&[(5, 51, "null")])).await.expect("send");
    // Its own id still goes through, which also orders the check after the attacks.
    ws.send(spoof(&[(6, 1, r#"{"n":"y"}"#)]))
        .await
        .expect("send");
    seen.wait(&mut watcher, 6, r#"{"n":"y"}"#).await;
    assert_eq!(seen.0[&5], r#"{"n":"owner"}"#);
    let stats = http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json();
    assert_eq!(stats["refused_awareness"], 2);
    let _ = ws.close(None).await;
    let _ = ws.next().await;
}

/// Reads until the server closes the connection (EOF or reset); how long that took.
async fn time_to_close(s: &mut tokio::net::TcpStream, since: std::time::Instant) -> Duration {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept a socket open past {DEADLINE:?}"),
        }
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_sockets_are_reaped_and_new_clients_still_get_in() {
    use tokio::io::AsyncWriteExt;
    const EACH: usize = 1_000;
    let header_timeout = Duration::from_secs(2);
    let server = TestServer::start(|c| {
        c.header_timeout = header_timeout;
        c.max_connections_per_ip = 0; // every test client shares 127.0.0.1
        c.max_connections_per_second = 10_000;
    })
    .await;
    let started = std::time::Instant::now();
    let mut trickling = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..EACH {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            .await
            .expect("write");
        trickling.push(s);
        silent.push(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect"),
        );
    }
    // One byte per trickling socket now and then: never completing the head must not buy time.
    for s in trickling.iter_mut().take(100) {
        let _ = s.write_all(b"X").await;
    }
    // Meanwhile new clients are served.
    let mut latencies = Vec::new();
    for _ in 0..50 {
        let t = std::time::Instant::now();
        let r = http::get(server.addr, "/healthz").await.expect("GET");
        assert_eq!(r.status, 200);
        latencies.push(t.elapsed());
    }
    let mut reaped = Vec::new();
    for s in trickling.iter_mut().chain(silent.iter_mut()) {
        reaped.push(time_to_close(s, started).await);
    }
    let last = reaped.iter().max().copied().unwrap_or_default();
    assert!(
        reaped.iter().all(|t| *t >= header_timeout / 2),
        "nothing is dropped long before the header timeout"
    );
    eprintln!(
        "slowloris: {EACH} trickling + {EACH} silent sockets all reaped {last:?} after they \
         connected (header timeout {header_timeout:?}); new-connection p99 meanwhile {:?}",
        p99(latencies)
    );
}

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let server = TestServer::start(|c| c.max_connections_per_ip = 20).await;
    let mut held = Vec::new();
    for _ in 0..19 {
        held.push(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect"),
        );
    }
    // Sockets count too: the 20th connection is a WebSocket, which keeps its place.
    let mut ws = NativeClient::connect(&server.ws_url()).await;
    ws.subscribe_synced("share").await;
    let mut over = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let closed = time_to_close(&mut over, std::time::Instant::now()).await;
    eprintln!("connection over the per-address limit closed after {closed:?}");
    drop(held);
    drop(over);
    let stats = chorus_tests::eventually("a freed place admits again", DEADLINE, || async {
        http::get(server.addr, "/v1/stats")
            .await
            .ok()
            .map(|r| r.json())
    })
    .await;
    assert!(stats["refused_per_ip"].as_u64() >= Some(1));
    // The socket kept working throughout.
    let s = ws.insert("share", 0, "ok").await;
    ws.wait_acked(s).await;
}

/// A raw WebSocket upgrade on `/v1/ws`, offering `extensions`; returns the socket and the
/// response head (lower-cased).
async fn raw_upgrade(
    addr: std::net::SocketAddr,
    extensions: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extensions}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read");
        assert!(n > 0, "upgrade answered");
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).to_ascii_lowercase())
}

/// Reads server frames until a close frame; its code.
async fn close_code(s: &mut tokio::net::TcpStream) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut hdr = [0u8; 2];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut hdr))
            .await
            .expect("a frame in time")
            .ok()?;
        let len = match hdr[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).ok()?];
        s.read_exact(&mut payload).await.ok()?;
        if hdr[0] & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[tokio::test]
async fn deflate_is_never_negotiated_so_a_compression_bomb_cannot_land() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(|_| {}).await;
    let (mut s, head) = raw_upgrade(
        server.addr,
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        !head.contains("sec-websocket-extensions"),
        "no extension accepted: {head}"
    );
    // A frame with the compression bit set is a protocol error: the socket closes at once.
    let started = std::time::Instant::now();
    s.write_all(&[0b1100_0010, 0x80 | 4, 0, 0, 0, 0, 1, 2, 3, 4])
        .await
        .expect("write");
    time_to_close(&mut s, started).await;
    eprintln!(
        "compressed frame refused; socket closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009_before_it_is_read() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(|c| c.max_message_bytes = 64 * 1024).await;
    let (mut s, head) = raw_upgrade(server.addr, "").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    // A frame header announcing 1 GiB, then only its first bytes: the limit is enforced on
    // the announced length, so nothing close to a gigabyte is ever buffered.
    let started = std::time::Instant::now();
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&[0u8; 1024]);
    s.write_all(&frame).await.expect("write");
    assert_eq!(close_code(&mut s).await, Some(1009));
    eprintln!(
        "1 GiB frame header over a 64 KiB limit: 1009 after {:?}",
        started.elapsed()
    );
    let mut ok = NativeClient::connect(&server.ws_url()).await;
    ok.subscribe_synced("big").await;
    let s = ok.insert("big", 0, "fine").await;
    ok.wait_acked(s).await;
}

#[tokio::test]
async fn a_message_flood_is_held_to_the_rate_and_closed_others_unaffected() {
    const LIMIT: u32 = 100;
    let server = TestServer::start(|c| c.max_messages_per_second = LIMIT).await;
    let mut flooder = NativeClient::connect(&server.ws_url()).await;
    flooder.subscribe_synced("flood").await;
    let mut calm = NativeClient::connect(&server.ws_url()).await;
    calm.subscribe_synced("flood").await;
    let started = std::time::Instant::now();
    let update = {
        use yrs::{Map, ReadTxn, Transact};
        let d = yrs::Doc::new();
        d.get_or_insert_map("m")
            .insert(&mut d.transact_mut(), "k", "v");
        d.transact().encode_state_as_update_v1(&Default::default())
    };
    for seq in 0..2_000 {
        // The same (idempotent) update over and over: only the rate limit is exercised.
        let frame = ClientFrame::Update {
            doc: "flood".into(),
            update: update.clone(),
            seq: Some(seq),
        };
        if !flooder.try_send(&frame).await {
            break;
        }
    }
    assert_eq!(flooder.wait_closed().await, Some(1008));
    let flood_time = started.elapsed();
    let limited = flooder
        .errors
        .iter()
        .filter(|e| {
            matches!(
                e,
                ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
            )
        })
        .count();
    assert!(
        limited > 0,
        "the excess was refused with rate_limited first"
    );
    let t = std::time::Instant::now();
    let s = calm.insert("flood", 0, "calm").await;
    calm.wait_acked(s).await;
    eprintln!(
        "flood: closed with 1008 {flood_time:?} after it began ({limited} rate_limited answers \
         read before the close; limit {LIMIT}/s, burst {}); a bystander's update acked {:?} later",
        2 * LIMIT,
        t.elapsed()
    );
}

#[tokio::test]
async fn forged_positions_lead_to_a_full_sync_or_a_typed_error_never_to_skipped_data() {
    let server = TestServer::start(|_| {}).await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("a").await;
    writer.subscribe_synced("b").await;
    let s = writer.insert("a", 0, "alpha").await;
    writer.wait_acked(s).await;
    let s = writer.insert("b", 0, "beta").await;
    let from_b = writer.wait_acked(s).await;

    // Another document's (valid) position: a different epoch, so a state sync with all of "a".
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_from("a", Some(from_b), None).await;
    let (_, _, replay) = c.wait_synced("a").await;
    assert!(
        !replay,
        "a position of another document is never replayed from"
    );
    assert_eq!(c.text("a"), "alpha");

    // Malformed positions: a typed error, and the socket keeps working.
    for position in [
        serde_json::json!("1.2-3"),
        serde_json::json!([1, 2]),
        serde_json::json!([-1, 0, 0]),
    ] {
        let frame = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "subscribe", "doc": "a", "position": position,
        }))
        .expect("encode");
        c.send_raw(Message::Binary(frame.into())).await;
        c.wait_for(|f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::BadFrame,
                    ..
                }
            )
        })
        .await;
    }
    let s = c.insert("a", 5, "!").await;
    c.wait_acked(s).await;
    writer.wait_text("a", "alpha!").await;
}

#[tokio::test]
async fn ten_thousand_writes_from_a_read_grant_change_nothing() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "read-only-secret";
    let server = TestServer::start(|c| {
        c.auth_secret = Some(secret.into());
        c.max_messages_per_second = 100_000;
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = |access: &str| {
        encode(
            &Header::default(),
            &serde_json::json!({"sub": access, "exp": exp, "docs": [{"doc": "ro", "access": access}]}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("token")
    };
    let writer_token = token("write");
    let mut writer =
        NativeClient::connect(&format!("{}?token={writer_token}", server.ws_url())).await;
    writer.subscribe_synced("ro").await;
    let s = writer.insert("ro", 0, "original").await;
    writer.wait_acked(s).await;
    let path = format!("/v1/docs/ro?token={writer_token}");
    let before = http::get(server.addr, &path).await.expect("GET").body;

    let reader_token = token("read");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/ro?token={reader_token}", server.yjs_base()))
            .await
            .expect("a read grant connects");
    let update = {
        use yrs::{ReadTxn, Text, Transact};
        let d = yrs::Doc::new();
        d.get_or_insert_text("t")
            .insert(&mut d.transact_mut(), 0, "vandal");
        d.transact().encode_state_as_update_v1(&Default::default())
    };
    const WRITES: usize = 10_000;
    for i in 0..WRITES {
        // Alternate sync step 2 and update messages.
        let mut m = vec![0u8, if i % 2 == 0 { 1 } else { 2 }, update.len() as u8];
        m.extend_from_slice(&update);
        ws.send(Message::Binary(m.into())).await.expect("send");
    }
    let stats = chorus_tests::eventually("every write refused and counted", DEADLINE, || async {
        let s = http::get(server.addr, "/v1/stats").await.ok()?.json();
        (s["refused_writes"].as_u64()? >= WRITES as u64).then_some(s)
    })
    .await;
    assert_eq!(stats["refused_writes"], WRITES);
    let after = http::get(server.addr, &path).await.expect("GET").body;
    assert_eq!(before, after, "the document is byte-for-byte unchanged");
    let _ = writer.drain_for(Duration::from_millis(50)).await;
    assert_eq!(writer.text("ro"), "original");
}

/// Issue 16's flood: sockets that never read ask for a 1 MB document again and again (a
/// y-websocket sync step 1 with an empty state vector, a native re-subscribe). One answer
/// waits per document and a socket over its budget is not read further, so the node holds
/// about one copy per flooder instead of one per request, and serves everyone else.
#[tokio::test]
async fn sockets_that_ask_for_a_large_document_again_and_again_without_reading_cost_one_copy() {
    use chorus_tests::{ServerProcess, process_rss_kb};
    const DOC_BYTES: usize = 1 << 20;
    const REQUESTS: usize = 2000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::spawn(tmp.path(), &[]).await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("big").await;
    let seq = writer.insert("big", 0, &"x".repeat(DOC_BYTES)).await;
    writer.wait_acked(seq).await;
    let before = process_rss_kb(server.pid());

    let yjs = format!("ws://{}/y/big", server.addr);
    let mut y = NativeClient::connect_small_window(&yjs, 4096)
        .await
        .into_silent();
    let mut n = NativeClient::connect_small_window(&server.ws_url(), 4096)
        .await
        .into_silent();
    let step1 = Message::Binary(vec![0u8, 0, 1, 0].into());
    let subscribe = ClientFrame::Subscribe {
        doc: "big".into(),
        position: None,
        state_vector: None,
    }
    .encode()
    .expect("encode");
    let subscribe = Message::Binary(subscribe.into());
    let short = Duration::from_millis(200);
    let (mut y_open, mut n_open) = (true, true);
    for _ in 0..REQUESTS {
        // A send that cannot complete means the node stopped reading that socket.
        y_open = y_open
            && matches!(
                tokio::time::timeout(short, y.send(step1.clone())).await,
                Ok(Ok(()))
            );
        n_open = n_open
            && matches!(
                tokio::time::timeout(short, n.send(subscribe.clone())).await,
                Ok(Ok(()))
            );
    }

    // The node keeps serving: a new reader gets the whole document.
    let mut bystander = NativeClient::connect(&server.ws_url()).await;
    bystander.subscribe_synced("big").await;
    assert_eq!(bystander.text("big").len(), DOC_BYTES);
    // Whatever the node went on to read of the floods, it stays within one copy or two each.
    let mut most_outbox = 0;
    let mut most_rss = 0;
    for _ in 0..40 {
        let stats = http::get(server.addr, "/v1/stats")
            .await
            .expect("stats")
            .json();
        most_outbox = most_outbox.max(
            stats["outbox"]["largest_pending_bytes"]
                .as_u64()
                .unwrap_or(0),
        );
        most_rss = most_rss.max(process_rss_kb(server.pid()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let growth_mb = most_rss.saturating_sub(before) / 1024;
    eprintln!(
        "flood: {REQUESTS} requests per socket; server RSS +{growth_mb} MB, largest outbox {most_outbox} B"
    );
    assert!(growth_mb <= 64, "server RSS grew by {growth_mb} MB");
    assert!(
        most_outbox <= 3 * DOC_BYTES as u64,
        "an outbox held {most_outbox} bytes"
    );
    drop((y, n));
    server.kill9().await;
}

/// Our own client re-subscribes a document on the same socket (after a reconnect of its
/// document API): its presence stays its own, and its leave still clears it.
#[tokio::test]
async fn re_subscribing_on_the_same_socket_keeps_its_presence_and_its_leave_clears_it() {
    let server = TestServer::start(|_| {}).await;
    let mut a = NativeClient::connect(&server.ws_url()).await;
    let mut watcher = NativeClient::connect(&server.ws_url()).await;
    a.subscribe_synced("again").await;
    watcher.subscribe_synced("again").await;
    let mut seen = Presence::default();
    send_awareness(&mut a, "again", &[(77, 1, r#"{"n":1}"#)]).await;
    seen.wait(&mut watcher, 77, r#"{"n":1}"#).await;
    a.subscribe_synced("again").await;
    send_awareness(&mut a, "again", &[(77, 2, r#"{"n":2}"#)]).await;
    seen.wait(&mut watcher, 77, r#"{"n":2}"#).await;
    a.drain_for(Duration::from_millis(50)).await;
    assert!(a.errors.is_empty(), "{:?}", a.errors);
    a.close().await;
    seen.wait(&mut watcher, 77, "null").await;
}
