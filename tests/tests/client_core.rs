//! The client's sans-IO core (`chorus-client`'s `Session`) driven natively against a real node: sync, acks, resume after a restart.

use chorus_client::{CloseDecision, Event, Session, SessionConfig, Status};
use chorus_tests::{DEADLINE, TestServer};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The smallest possible driver: one socket, the session's frames written in order, and the
/// server's frames fed back. (The browser driver in `client-wasm/src/wasm.rs` does the same with
/// a browser WebSocket and timers.)
struct Driver {
    session: Session,
    ws: Option<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    events: Vec<Event>,
}

impl Driver {
    fn new() -> Self {
        Driver {
            session: Session::new(SessionConfig::default()),
            ws: None,
            events: Vec::new(),
        }
    }

    async fn connect(&mut self, url: &str) {
        self.session.connecting();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        self.ws = Some(ws);
        self.session.opened();
        self.flush().await;
    }

    async fn flush(&mut self) {
        while let Some(bytes) = self.session.poll_transmit() {
            if let Some(ws) = &mut self.ws {
                ws.send(Message::Binary(bytes.into())).await.expect("send");
            }
        }
        self.events
            .extend(std::iter::from_fn(|| self.session.poll_event()));
    }

    /// Feeds server frames to the session until `done` holds, or fails after the deadline.
    async fn until(&mut self, what: &str, done: impl Fn(&Driver) -> bool) {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            self.flush().await;
            if done(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "timed out waiting for: {what}"
            );
            let Some(ws) = &mut self.ws else {
                panic!("no socket while waiting for: {what}");
            };
            match tokio::time::timeout(Duration::from_millis(50), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.session.received(&b),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    self.ws = None;
                    let d = self.session.closed(code, 0.5, false);
                    self.flush().await;
                    assert!(matches!(d, CloseDecision::Reconnect { .. }), "{code}");
                    return assert!(done(self), "socket closed while waiting for: {what}");
                }
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(Some(Err(_))) | Ok(None) => {
                    self.ws = None;
                    self.session.closed(1006, 0.5, false);
                }
            }
        }
    }

    fn text(&self, doc: &str) -> String {
        self.session.doc(doc).expect("doc").text()
    }

    fn pending(&self, doc: &str) -> usize {
        self.session.doc(doc).expect("doc").pending_seqs().len()
    }
}

#[tokio::test]
async fn two_sessions_converge_through_a_node() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, mut b) = (Driver::new(), Driver::new());
    for d in [&mut a, &mut b] {
        d.session.open("notes").expect("open");
        d.session.open("other").expect("open");
        d.connect(&server.ws_url()).await;
        d.until("synced", |d| d.session.status() == Some(&Status::Synced))
            .await;
    }
    a.session.insert("notes", 0, "hello").expect("insert");
    a.until("ack", |d| d.pending("notes") == 0).await;
    b.until("a's text", |d| d.text("notes") == "hello").await;
    b.session.insert("notes", 5, " world").expect("insert");
    b.until("ack", |d| d.pending("notes") == 0).await;
    a.until("b's text", |d| d.text("notes") == "hello world")
        .await;
    assert!(a.events.iter().any(|e| matches!(
        e,
        Event::TextChanged { doc, ops } if doc == "notes" && !ops.is_empty()
    )));
    // Presence crosses too.
    a.session
        .set_presence("notes", Some(r#"{"name":"a"}"#))
        .expect("presence");
    a.flush().await;
    b.until("a's presence", |d| {
        d.session.doc("notes").expect("doc").presence_states().len() == 1
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn resumes_by_replay_and_resends_offline_edits_after_a_restart() {
    let server = TestServer::start(|_| {}).await;
    let (mut a, mut b) = (Driver::new(), Driver::new());
    for d in [&mut a, &mut b] {
        d.session.open("doc").expect("open");
        d.connect(&server.ws_url()).await;
        d.until("synced", |d| d.session.status() == Some(&Status::Synced))
            .await;
    }
    a.session.insert("doc", 0, "before.").expect("insert");
    a.until("ack", |d| d.pending("doc") == 0).await;
    b.until("text", |d| d.text("doc") == "before.").await;

    // Graceful stop: both are told 1001 ("going away, reconnect").
    let stop = tokio::spawn(server.stop_keep_data());
    for d in [&mut a, &mut b] {
        d.until("reconnecting", |d| {
            matches!(d.session.status(), Some(Status::Reconnecting { .. }))
        })
        .await;
    }
    let dir = stop.await.expect("stop").expect("data dir");
    a.session.insert("doc", 7, " offline-a.").expect("insert");
    assert_eq!(a.pending("doc"), 1, "queued while the node is down");

    let server = TestServer::start_in(dir.path(), |_| {}).await;
    for d in [&mut a, &mut b] {
        d.events.clear();
        d.connect(&server.ws_url()).await;
        d.until("synced again", |d| {
            d.session.status() == Some(&Status::Synced) && d.pending("doc") == 0
        })
        .await;
        assert!(
            d.events.contains(&Event::Synced {
                doc: "doc".into(),
                replay: true
            }),
            "resumed from its position by exact replay"
        );
    }
    b.until("a's offline edit", |d| {
        d.text("doc") == "before. offline-a."
    })
    .await;
    assert_eq!(a.text("doc"), b.text("doc"));
    server.stop().await;
}
