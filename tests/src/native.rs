//! A native-protocol (`/v1/ws`) test client: real WebSocket, real yrs documents, and a record
//! of everything the server said (positions, acks, errors, close codes).

use crate::DEADLINE;
use chorus_protocol::{ClientFrame, Position, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

/// Test clients take whatever the server legitimately sends: a `synced` frame is as large as
/// the document (browsers have no frame cap; tungstenite's client default is 16 MiB).
fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_frame_size(None)
        .max_message_size(None)
}

/// What arrived from the server.
#[derive(Debug, Clone)]
pub enum Event {
    Frame(ServerFrame),
    /// The server closed the socket, with its close code if it sent one.
    Closed(Option<u16>),
}

pub struct NativeClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub docs: HashMap<String, Doc>,
    /// The last position received per document (the resume point).
    pub positions: HashMap<String, Position>,
    /// (doc, seq, position) of every ack.
    pub acks: Vec<(String, Option<u64>, Position)>,
    pub errors: Vec<ServerFrame>,
    /// Times a position went backwards within an epoch (must stay 0).
    pub regressions: usize,
    pub closed: Option<Option<u16>>,
    next_seq: u64,
}

impl NativeClient {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(client_config()), false)
                .await
                .expect("websocket connect");
        Self::from_stream(ws)
    }

    /// Connects once the node has room: a slot freed by a client that just went away is
    /// free only after the node has read that client's end, so a 503 is retried until then.
    pub async fn connect_when_admitted(url: &str) -> Self {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio_tungstenite::connect_async_with_config(url, Some(client_config()), false)
                .await
            {
                Ok((ws, _)) => return Self::from_stream(ws),
                Err(tokio_tungstenite::tungstenite::Error::Http(r))
                    if r.status() == 503 && tokio::time::Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("websocket connect: {e:?}"),
            }
        }
    }

    /// Connects, or `None` if the node refuses or is gone (for clients that reconnect to
    /// whichever node is up).
    pub async fn try_connect(url: &str) -> Option<Self> {
        let connect =
            tokio_tungstenite::connect_async_with_config(url, Some(client_config()), false);
        match tokio::time::timeout(DEADLINE, connect).await {
            Ok(Ok((ws, _))) => Some(Self::from_stream(ws)),
            _ => None,
        }
    }

    /// Connects with a small, fixed kernel receive buffer (no autotuning), like a client on a
    /// slow link: when it stops reading, backpressure reaches the server within kilobytes
    /// instead of the tens of megabytes loopback autotuning would absorb.
    pub async fn connect_small_window(url: &str, recv_buffer: u32) -> Self {
        let authority = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port");
        let addr: std::net::SocketAddr = authority.parse().expect("socket address");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(client_config()),
        )
        .await
        .expect("websocket handshake");
        Self::from_stream(ws)
    }

    fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Self {
        NativeClient {
            ws,
            docs: HashMap::new(),
            positions: HashMap::new(),
            acks: Vec::new(),
            errors: Vec::new(),
            regressions: 0,
            closed: None,
            next_seq: 1,
        }
    }

    pub fn doc(&mut self, doc: &str) -> &Doc {
        self.docs.entry(doc.to_string()).or_default()
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = frame.encode().expect("encode");
        self.send_raw(Message::Binary(bytes.into())).await;
    }

    /// Sends unless the socket is already gone (for floods that the server ends mid-way).
    pub async fn try_send(&mut self, frame: &ClientFrame) -> bool {
        let bytes = frame.encode().expect("encode");
        self.ws.send(Message::Binary(bytes.into())).await.is_ok()
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Subscribes from the last position this client saw (if any) and its state vector.
    pub async fn subscribe(&mut self, doc: &str) {
        let position = self.positions.get(doc).copied();
        self.subscribe_from(doc, position, None).await;
    }

    pub async fn subscribe_from(
        &mut self,
        doc: &str,
        position: Option<Position>,
        state_vector: Option<Vec<u8>>,
    ) {
        self.doc(doc);
        self.send(&ClientFrame::Subscribe {
            doc: doc.to_string(),
            position,
            state_vector,
        })
        .await;
    }

    /// Subscribes and waits for `synced`; returns (update bytes, position, replay).
    pub async fn subscribe_synced(&mut self, doc: &str) -> (Vec<u8>, Position, bool) {
        self.subscribe(doc).await;
        self.wait_synced(doc).await
    }

    pub async fn wait_synced(&mut self, doc: &str) -> (Vec<u8>, Position, bool) {
        match self
            .wait_for(|f| matches!(f, ServerFrame::Synced { doc: d, .. } if d == doc))
            .await
        {
            ServerFrame::Synced {
                update,
                position,
                replay,
                ..
            } => (update, position, replay),
            _ => unreachable!(),
        }
    }

    /// Edits the local document and sends the resulting update; returns its `seq`.
    pub async fn insert(&mut self, doc: &str, index: u32, text: &str) -> u64 {
        let update = {
            let d = self.doc(doc);
            let t = d.get_or_insert_text("t");
            let before = d.transact().state_vector();
            t.insert(&mut d.transact_mut(), index, text);
            d.transact().encode_state_as_update_v1(&before)
        };
        self.send_update(doc, update).await
    }

    /// Sets `key` in the document's map "m" and sends the update; returns its `seq`.
    pub async fn set_map(&mut self, doc: &str, key: &str, value: &str) -> u64 {
        let update = {
            let d = self.doc(doc);
            let m = d.get_or_insert_map("m");
            let before = d.transact().state_vector();
            m.insert(&mut d.transact_mut(), key, value);
            d.transact().encode_state_as_update_v1(&before)
        };
        self.send_update(doc, update).await
    }

    pub fn map_value(&mut self, doc: &str, key: &str) -> Option<String> {
        let d = self.doc(doc);
        let m = d.get_or_insert_map("m");
        let txn = d.transact();
        m.get(&txn, key).map(|v| v.to_string(&txn))
    }

    pub async fn send_update(&mut self, doc: &str, update: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.send(&ClientFrame::Update {
            doc: doc.to_string(),
            update,
            seq: Some(seq),
        })
        .await;
        seq
    }

    pub fn text(&mut self, doc: &str) -> String {
        let d = self.doc(doc);
        let t = d.get_or_insert_text("t");
        t.get_string(&d.transact())
    }

    pub fn state_vector(&mut self, doc: &str) -> StateVector {
        self.doc(doc).transact().state_vector()
    }

    /// Next event, applying document frames to the local documents.
    pub async fn next_event(&mut self, deadline: Duration) -> Option<Event> {
        if let Some(code) = self.closed {
            return Some(Event::Closed(code));
        }
        loop {
            let msg = match tokio::time::timeout(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => {
                    self.closed = Some(None);
                    return Some(Event::Closed(None));
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Binary(b) => {
                    let frame = ServerFrame::decode(&b).expect("server sent an undecodable frame");
                    self.absorb(&frame);
                    return Some(Event::Frame(frame));
                }
                Message::Close(c) => {
                    let code = c.map(|c| u16::from(c.code));
                    self.closed = Some(code);
                    return Some(Event::Closed(code));
                }
                _ => continue,
            }
        }
    }

    fn absorb(&mut self, frame: &ServerFrame) {
        let (doc, update, position) = match frame {
            ServerFrame::Synced {
                doc,
                update,
                position,
                ..
            }
            | ServerFrame::Update {
                doc,
                update,
                position,
            } => (doc, Some(update), *position),
            ServerFrame::Ack { doc, seq, position } => {
                self.acks.push((doc.clone(), *seq, *position));
                (doc, None, *position)
            }
            ServerFrame::Error { .. } => {
                self.errors.push(frame.clone());
                return;
            }
            ServerFrame::Awareness { .. } | ServerFrame::AuthExpiring { .. } => return,
        };
        if let Some(update) = update {
            let d = self.doc(doc);
            let u = Update::decode_v1(update).expect("server update decodes");
            d.transact_mut()
                .apply_update(u)
                .expect("server update applies");
        }
        match self.positions.get(doc) {
            Some(old) if old.epoch == position.epoch && position.id < old.id => {
                self.regressions += 1
            }
            _ => {}
        }
        self.positions.insert(doc.clone(), position);
    }

    /// Waits for a frame matching `pred` (earlier frames are still applied and recorded).
    pub async fn wait_for(&mut self, pred: impl Fn(&ServerFrame) -> bool) -> ServerFrame {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::Frame(f)) if pred(&f) => return f,
                Some(Event::Frame(_)) => continue,
                Some(Event::Closed(code)) => {
                    panic!("socket closed ({code:?}) while waiting for a frame")
                }
                None => panic!("timed out waiting for a frame"),
            }
        }
    }

    /// Waits for the close and returns its code.
    pub async fn wait_closed(&mut self) -> Option<u16> {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::Closed(code)) => return code,
                Some(Event::Frame(_)) => continue,
                None => panic!("timed out waiting for the socket to close"),
            }
        }
    }

    /// Reads frames until the document's text equals `expected`.
    pub async fn wait_text(&mut self, doc: &str, expected: &str) {
        let until = tokio::time::Instant::now() + DEADLINE;
        while self.text(doc) != expected {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::Frame(_)) => {}
                other => panic!(
                    "waiting for text {expected:?}, have {:?}; got {other:?}",
                    self.text(doc)
                ),
            }
        }
    }

    /// Reads frames until every update this client sent has been acked.
    pub async fn wait_acked(&mut self, seq: u64) -> Position {
        let f = self
            .wait_for(|f| matches!(f, ServerFrame::Ack { seq: Some(s), .. } if *s == seq))
            .await;
        match f {
            ServerFrame::Ack { position, .. } => position,
            _ => unreachable!(),
        }
    }

    /// Reads whatever arrives within `quiet` (to let the server finish talking).
    pub async fn drain_for(&mut self, quiet: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event(quiet).await {
            let closed = matches!(e, Event::Closed(_));
            out.push(e);
            if closed {
                break;
            }
        }
        out
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Stops reading without closing: from the server's side the peer has gone silent.
    pub fn into_silent(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }
}
