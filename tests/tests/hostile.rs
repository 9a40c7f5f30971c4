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
