//! Test harness for change webhooks: a receiver (axum on port 0) that checks every signature, and an editor that POSTs real yrs updates.

use crate::http;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact};

pub const SECRET: &str = "webhook-test-secret";

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    /// 500 Internal Server Error.
    Fail,
    /// Never answers (the node's request times out).
    Hang,
}

/// One request the receiver accepted (2xx).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: serde_json::Value,
    pub delivery_id: String,
    pub at: Instant,
}

impl Delivery {
    pub fn doc(&self) -> &str {
        self.body["doc"].as_str().expect("doc")
    }
    pub fn from(&self) -> Option<&str> {
        self.body["from"].as_str()
    }
    pub fn to(&self) -> &str {
        self.body["to"].as_str().expect("to")
    }
    pub fn updates(&self) -> u64 {
        self.body["updates"].as_u64().expect("updates")
    }
    pub fn bytes(&self) -> u64 {
        self.body["bytes"].as_u64().expect("bytes")
    }
}

struct Inner {
    mode: Mutex<Mode>,
    accepted: Mutex<Vec<Delivery>>,
    /// Every request, answered or not.
    attempts: Mutex<u64>,
    /// Requests whose signature (or body) was wrong: any fails the test.
    bad: Mutex<Vec<String>>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Receiver {
    pub async fn start(mode: Mode) -> Self {
        let inner = Arc::new(Inner {
            mode: Mutex::new(mode),
            accepted: Mutex::new(Vec::new()),
            attempts: Mutex::new(0),
            bad: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(receive))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, inner, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.inner.mode) = mode;
    }

    fn check_signatures(&self) {
        let bad = lock(&self.inner.bad);
        assert!(bad.is_empty(), "requests with a bad signature: {bad:?}");
    }

    /// Accepted deliveries so far (fails the test if any request was badly signed).
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.check_signatures();
        lock(&self.inner.accepted).clone()
    }

    /// Accepted deliveries of `doc`, oldest first.
    pub fn deliveries_of(&self, doc: &str) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.doc() == doc)
            .collect()
    }

    /// Requests received, accepted or not.
    pub fn attempts(&self) -> u64 {
        self.check_signatures();
        *lock(&self.inner.attempts)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Verifies, records and answers one request.
async fn receive(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    *lock(&inner.attempts) += 1;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    mac.update(&body);
    let expected = format!("sha256={}", hex(&mac.finalize().into_bytes()));
    let parsed = serde_json::from_slice::<serde_json::Value>(&body);
    match (
        header("x-chorus-signature"),
        header("x-chorus-delivery"),
        parsed,
    ) {
        (Some(sig), Some(id), Ok(body)) if sig == expected && !id.is_empty() => {
            let mode = *lock(&inner.mode);
            match mode {
                Mode::Ok => {
                    lock(&inner.accepted).push(Delivery {
                        body,
                        delivery_id: id,
                        at: Instant::now(),
                    });
                    StatusCode::NO_CONTENT
                }
                Mode::Fail => StatusCode::INTERNAL_SERVER_ERROR,
                Mode::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    StatusCode::NO_CONTENT
                }
            }
        }
        (sig, id, parsed) => {
            lock(&inner.bad).push(format!(
                "signature {sig:?} (expected {expected}), delivery {id:?}, body parses: {}",
                parsed.is_ok()
            ));
            StatusCode::UNAUTHORIZED
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client that edits one document through `POST /v1/docs/{doc}/updates`.
pub struct Editor {
    pub doc_id: String,
    doc: yrs::Doc,
    /// Every acknowledged position, oldest first, with the update's length.
    pub acked: Vec<(String, usize)>,
}

impl Editor {
    pub fn new(doc_id: &str) -> Self {
        Editor {
            doc_id: doc_id.to_string(),
            doc: yrs::Doc::new(),
            acked: Vec::new(),
        }
    }

    /// Inserts `text` and POSTs the update to `node`; returns the acknowledged position.
    pub async fn edit(&mut self, node: SocketAddr, text: &str) -> String {
        let before = self.doc.transact().state_vector();
        {
            let t = self.doc.get_or_insert_text("t");
            let mut txn = self.doc.transact_mut();
            let len = t.len(&txn);
            t.insert(&mut txn, len, text);
        }
        let update = self.doc.transact().encode_state_as_update_v1(&before);
        let r = http::post(node, &format!("/v1/docs/{}/updates", self.doc_id), &update)
            .await
            .expect("POST update");
        assert_eq!(
            r.status,
            200,
            "POST update: {}",
            String::from_utf8_lossy(&r.body)
        );
        let position = r.json()["position"].as_str().expect("position").to_string();
        self.acked.push((position.clone(), update.len()));
        position
    }

    pub fn text(&self) -> String {
        let t = self.doc.get_or_insert_text("t");
        t.get_string(&self.doc.transact())
    }

    pub fn last(&self) -> &str {
        &self.acked.last().expect("an acked edit").0
    }
}

/// What a receiver holds of a document, caught up the documented way.
pub struct Replica {
    pub doc: yrs::Doc,
}

impl Replica {
    pub fn new() -> Self {
        Replica {
            doc: yrs::Doc::new(),
        }
    }

    /// `GET /v1/docs/{doc}/updates?after=FROM` (whole document without `from`), applied;
    /// returns the answer's `X-Chorus-Sync` and `X-Chorus-Position`.
    pub async fn catch_up(
        &self,
        node: SocketAddr,
        doc: &str,
        from: Option<&str>,
    ) -> (String, String) {
        let path = match from {
            Some(p) => format!("/v1/docs/{doc}/updates?after={p}&wait=0"),
            None => format!("/v1/docs/{doc}/updates?wait=0"),
        };
        let r = http::get(node, &path).await.expect("GET updates");
        assert_eq!(r.status, 200, "GET {path}");
        let update = yrs::Update::decode_v1(&r.body).expect("decode update");
        self.doc.transact_mut().apply_update(update).expect("apply");
        (
            r.header("x-chorus-sync").unwrap_or_default().to_string(),
            r.header("x-chorus-position")
                .unwrap_or_default()
                .to_string(),
        )
    }

    pub fn text(&self) -> String {
        let t = self.doc.get_or_insert_text("t");
        t.get_string(&self.doc.transact())
    }
}

impl Default for Replica {
    fn default() -> Self {
        Self::new()
    }
}

/// The `--webhook-*` flags of a `chorus serve` process (short durations for tests).
pub fn process_flags<'a>(urls: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    let mut flags = Vec::new();
    for url in urls {
        flags.extend(["--webhook-url", url.as_str()]);
    }
    flags.extend(["--webhook-secret", SECRET]);
    flags.extend(rest.iter().copied());
    flags
}
