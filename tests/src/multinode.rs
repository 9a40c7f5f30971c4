//! Helpers for tests with several nodes sharing one Redis: start nodes, edit concurrently from
//! clients spread over them, and check that everybody converged with nothing acked lost.

use crate::native::{Event, NativeClient};
use crate::{DEADLINE, TestServer, eventually, http};
use chorus_protocol::{ClientFrame, ServerFrame};
use std::path::Path;
use std::time::Duration;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, StateVector, Transact};

/// `n` in-process nodes on one Redis (URL as given to `--redis-url`), sharing `snapshots`.
pub async fn start_nodes(
    redis_url: &str,
    snapshots: &Path,
    n: usize,
    tune: impl Fn(&mut chorus_server::Config),
) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(
            TestServer::start(|c| {
                c.redis_url = vec![redis_url.to_string()];
                c.snapshot_dir = Some(snapshots.to_path_buf());
                tune(c);
            })
            .await,
        );
    }
    nodes
}

/// One client's record of a run: the tokens it inserted and which of them were acked.
pub struct Writer {
    pub client: NativeClient,
    pub tokens: Vec<(u64, String)>,
    pub acked: Vec<String>,
    pub failed: usize,
}

/// Inserts `count` unique tokens at the end of the client's text, one update each, reading
/// whatever arrives in between (so the client sees everybody's edits as it goes). Pauses
/// `pause` between inserts. Records acks and `append_failed` errors.
pub async fn write_tokens(
    mut client: NativeClient,
    doc: &str,
    name: String,
    count: usize,
    pause: Duration,
) -> Writer {
    let mut tokens = Vec::new();
    for i in 0..count {
        let token = format!("[{name}-{i}]");
        let len = client.text(doc).chars().count() as u32;
        let seq = client.insert(doc, len, &token).await;
        tokens.push((seq, token));
        // Read what is there without waiting long: keeps the socket drained.
        while let Some(Event::Frame(_)) = client.next_event(pause).await {}
    }
    let mut w = Writer {
        client,
        tokens,
        acked: Vec::new(),
        failed: 0,
    };
    settle(&mut w, doc).await;
    w
}

/// Reads until every sent token is either acked or failed.
pub async fn settle(w: &mut Writer, doc: &str) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let answered: usize =
            w.tokens
                .iter()
                .filter(|(seq, _)| {
                    w.client
                        .acks
                        .iter()
                        .any(|(d, s, _)| d == doc && *s == Some(*seq))
                        || w.client.errors.iter().any(
                            |e| matches!(e, ServerFrame::Error { seq: Some(s), .. } if s == seq),
                        )
                })
                .count();
        if answered == w.tokens.len() {
            break;
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "updates neither acked nor failed: {} of {}",
            w.tokens.len() - answered,
            w.tokens.len()
        );
        if let Some(Event::Closed(code)) = w.client.next_event(left).await {
            panic!("socket closed ({code:?}) while waiting for acks");
        }
    }
    w.acked = w
        .tokens
        .iter()
        .filter(|(seq, _)| {
            w.client
                .acks
                .iter()
                .any(|(d, s, _)| d == doc && *s == Some(*seq))
        })
        .map(|(_, t)| t.clone())
        .collect();
    w.failed = w.tokens.len() - w.acked.len();
}

/// What a client with unacknowledged updates does: send its whole state again (CRDT updates
/// apply once, so what was appended already is a no-op).
pub async fn resend_state(client: &mut NativeClient, doc: &str) -> u64 {
    let state = client
        .doc(doc)
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    client.send_update(doc, state).await
}

/// Resends the client's state until it is acknowledged, backing off on `append_failed` (what a
/// real client does while Redis is coming back).
pub async fn resend_until_acked(client: &mut NativeClient, doc: &str) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let seq = resend_state(client, doc).await;
        let answer = client
            .wait_for(|f| match f {
                ServerFrame::Ack { seq: Some(s), .. } | ServerFrame::Error { seq: Some(s), .. } => {
                    *s == seq
                }
                _ => false,
            })
            .await;
        if matches!(answer, ServerFrame::Ack { .. }) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "resent state never acknowledged: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads on every client until all hold the same state (compared as [`canonical_state`] bytes) containing
/// `must_contain`; returns that text. Fails on a position regression.
pub async fn converge(
    clients: &mut [&mut NativeClient],
    doc: &str,
    must_contain: &[String],
) -> String {
    let until = tokio::time::Instant::now() + DEADLINE * 2;
    loop {
        for c in clients.iter_mut() {
            while let Some(Event::Frame(_)) = c.next_event(Duration::from_millis(5)).await {}
        }
        let texts: Vec<String> = clients.iter_mut().map(|c| c.text(doc)).collect();
        let states: Vec<Vec<u8>> = clients
            .iter_mut()
            .map(|c| canonical_state(c.doc(doc)))
            .collect();
        let complete = must_contain.iter().all(|t| texts[0].contains(t.as_str()));
        if complete && states.windows(2).all(|w| w[0] == w[1]) {
            for c in clients.iter() {
                assert_eq!(c.regressions, 0, "a client saw a position go backwards");
            }
            return texts[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < until,
            "clients did not converge: complete={complete}, texts={texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica's state in a form that is equal byte for byte whenever the replicas hold the same
/// CRDT content: its state vector (which items it has, sorted by client) followed by the text those
/// items make. The raw `encode_state_as_update_v1` bytes are not comparable: a replica squashes
/// its own consecutive edits into one block while another keeps the same items in several
/// blocks, so identical documents encode differently (seen in the cluster test).
pub fn canonical_state(doc: &yrs::Doc) -> Vec<u8> {
    use yrs::GetString;
    let txn = doc.transact();
    // Sorted by client: the state vector is a hash map, and its own encoding follows the
    // map's (randomly seeded) iteration order.
    let mut clocks: Vec<(u64, u32)> = txn
        .state_vector()
        .iter()
        .map(|(c, clock)| (c.get(), *clock))
        .collect();
    clocks.sort();
    let mut out = Vec::new();
    for (c, clock) in clocks {
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(&clock.to_le_bytes());
    }
    if let Some(t) = txn.get_text("t") {
        out.extend_from_slice(t.get_string(&txn).as_bytes());
    }
    out
}

/// The document as a node serves it over HTTP, decoded to its text.
pub async fn node_text(addr: std::net::SocketAddr, doc: &str) -> Option<String> {
    let resp = http::get(addr, &format!("/v1/docs/{doc}")).await.ok()?;
    if resp.status != 200 {
        return None;
    }
    let d = yrs::Doc::new();
    d.transact_mut()
        .apply_update(yrs::Update::decode_v1(&resp.body).ok()?)
        .ok()?;
    use yrs::GetString;
    let t = d.get_or_insert_text("t");
    let s = t.get_string(&d.transact());
    Some(s)
}

/// Waits until a node serves a text containing every token.
pub async fn node_has_all(addr: std::net::SocketAddr, doc: &str, tokens: &[String]) {
    eventually("a node serves every acked update", DEADLINE, || async {
        let t = node_text(addr, doc).await?;
        tokens.iter().all(|k| t.contains(k.as_str())).then_some(())
    })
    .await;
}

/// A y-protocols awareness update for client `id` with `state` (JSON), or its removal.
pub fn awareness_update(id: u64, clock: u32, state: Option<&str>) -> Vec<u8> {
    let mut clients = std::collections::HashMap::new();
    clients.insert(
        yrs::ClientID::new(id),
        yrs::sync::awareness::AwarenessUpdateEntry {
            clock,
            json: state.unwrap_or("null").into(),
        },
    );
    yrs::sync::awareness::AwarenessUpdate { clients }.encode_v1()
}

pub async fn send_awareness(client: &mut NativeClient, doc: &str, update: Vec<u8>) {
    client
        .send(&ClientFrame::Awareness {
            doc: doc.to_string(),
            update,
        })
        .await;
}

/// Reads until an awareness frame says client `id` has `state` (`None`: was removed).
pub async fn wait_awareness(
    client: &mut NativeClient,
    doc: &str,
    id: u64,
    state: Option<&str>,
    deadline: Duration,
) {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match client.next_event(left).await {
            Some(Event::Frame(ServerFrame::Awareness { doc: d, update })) if d == doc => {
                let u = yrs::sync::awareness::AwarenessUpdate::decode_v1(&update)
                    .expect("awareness decodes");
                if let Some(e) = u.clients.get(&yrs::ClientID::new(id)) {
                    let is_null = &*e.json == "null";
                    match state {
                        None if is_null => return,
                        Some(s) if !is_null && e.json.contains(s) => return,
                        _ => {}
                    }
                }
            }
            Some(Event::Frame(_)) => {}
            other => panic!("waiting for awareness of {id} ({state:?}): got {other:?}"),
        }
    }
}
