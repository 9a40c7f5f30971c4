//! One-way readers for tests: a Server-Sent Events client (raw HTTP/1.1 over TCP, chunked
//! body parsed as it arrives) and a long-poll client, each applying what it receives to its own
//! yrs document exactly as a dashboard or indexer would.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chorus_protocol::Position;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yrs::updates::decoder::Decode;
use yrs::{GetString, Transact};

/// One event as the server framed it.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// `event:`; `None` is the default `message`.
    pub name: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn position(&self) -> Option<Position> {
        self.id.as_deref().and_then(|i| i.parse().ok())
    }

    pub fn bytes(&self) -> Vec<u8> {
        B64.decode(&self.data).expect("base64 data")
    }
}

/// An open event stream.
pub struct SseClient {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    stream: TcpStream,
    /// Raw bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked body text not yet split into events.
    text: String,
    chunked: bool,
    pub ended: bool,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
    /// The last `id:` seen, what a reconnect sends as `Last-Event-ID`.
    pub last_id: Option<String>,
    pub doc: yrs::Doc,
}

impl SseClient {
    /// `GET path` with extra headers; returns once the response head has arrived.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::request(stream, addr, path, headers).await
    }

    /// Connects with a small, fixed kernel receive buffer, like a reader on a slow link: when
    /// it stops reading, backpressure reaches the server within kilobytes.
    pub async fn connect_small_window(addr: SocketAddr, path: &str, recv_buffer: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        Self::request(stream, addr, path, &[]).await
    }

    async fn request(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Self {
        let mut req =
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(crate::DEADLINE, stream.read(&mut buf))
                .await
                .expect("response head in time")
                .expect("read");
            assert!(n > 0, "connection closed before a response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let mut c = SseClient {
            status,
            headers,
            stream,
            raw: raw[end + 4..].to_vec(),
            text: String::new(),
            chunked,
            ended: false,
            comments: 0,
            last_id: None,
            doc: yrs::Doc::new(),
        };
        // The first events may have come in the same read as the head.
        c.dechunk();
        c
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The rest of the body (for error answers).
    pub async fn body(mut self) -> String {
        let length: Option<usize> = self.header("content-length").and_then(|v| v.parse().ok());
        let until = tokio::time::Instant::now() + crate::DEADLINE;
        self.dechunk();
        // The connection is kept alive: read what the head announced, not to the end.
        while !self.ended && length.is_none_or(|n| self.text.len() < n) {
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(until, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    self.raw.extend_from_slice(&buf[..n]);
                    self.dechunk();
                }
                _ => break,
            }
        }
        self.text
    }

    fn dechunk(&mut self) {
        if !self.chunked {
            self.text.push_str(&String::from_utf8_lossy(&self.raw));
            self.raw.clear();
            return;
        }
        loop {
            let Some(nl) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..nl])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .expect("chunk size");
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            if self.raw.len() < nl + 2 + size + 2 {
                return;
            }
            let chunk = self.raw[nl + 2..nl + 2 + size].to_vec();
            self.text.push_str(&String::from_utf8_lossy(&chunk));
            self.raw.drain(..nl + 2 + size + 2);
        }
    }

    /// The next complete event, reading for at most `wait`; `None` on timeout or end.
    pub async fn next_event(&mut self, wait: Duration) -> Option<SseEvent> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            if let Some(e) = self.take_event() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 16384];
            match tokio::time::timeout_at(until, self.stream.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.ended = true;
                    self.dechunk();
                }
                Ok(Ok(n)) => {
                    self.raw.extend_from_slice(&buf[..n]);
                    self.dechunk();
                }
            }
        }
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.text.find("\n\n")?;
            let block: String = self.text.drain(..end + 2).collect();
            let mut e = SseEvent {
                name: None,
                id: None,
                data: String::new(),
            };
            let mut fields = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (k, v) = line.split_once(": ").unwrap_or((line, ""));
                match k {
                    "event" => e.name = Some(v.to_string()),
                    "id" => e.id = Some(v.to_string()),
                    "data" => e.data.push_str(v),
                    _ => continue,
                }
                fields = true;
            }
            if !fields || e.data.is_empty() && e.name.is_none() {
                continue; // a comment-only block, or `retry:`
            }
            if e.id.is_some() {
                self.last_id = e.id.clone();
            }
            return Some(e);
        }
    }

    /// Reads events, applying document data to `self.doc`, until `pred` holds on the text.
    pub async fn read_until(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> Vec<SseEvent> {
        self.read_until_doc(what, crate::DEADLINE, |d| {
            pred(&d.get_or_insert_text("t").get_string(&d.transact()))
        })
        .await
    }

    /// Reads events, applying document data, until `pred` holds on the document.
    pub async fn read_until_doc(
        &mut self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&yrs::Doc) -> bool,
    ) -> Vec<SseEvent> {
        let until = tokio::time::Instant::now() + deadline;
        let mut seen = Vec::new();
        while !pred(&self.doc) {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for: {what}; status {}, events {seen:?}, text {:?}",
                self.status,
                self.text_of_doc()
            );
            match self.next_event(left).await {
                Some(e) => {
                    self.apply(&e);
                    seen.push(e);
                }
                None if self.ended => panic!("stream ended while waiting for: {what}"),
                None => {}
            }
        }
        seen
    }

    /// Applies a document event (`message` or `state`) to the reader's document.
    pub fn apply(&mut self, e: &SseEvent) {
        if e.name.is_none() || e.name.as_deref() == Some("state") {
            apply(&self.doc, &e.bytes());
        }
    }

    pub fn text_of_doc(&self) -> String {
        self.doc
            .get_or_insert_text("t")
            .get_string(&self.doc.transact())
    }
}

pub fn apply(doc: &yrs::Doc, update: &[u8]) {
    doc.transact_mut()
        .apply_update(yrs::Update::decode_v1(update).expect("decode update"))
        .expect("apply update");
}
