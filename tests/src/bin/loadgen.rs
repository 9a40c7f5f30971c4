//! Load generator (outside the data flow: it plays the clients at step 1 and the readers at
//! step 6) for Chorus and its peers, one scenario per run; `scripts/bench.sh` drives it.
//!
//! ```text
//! loadgen --proto native|yws|hocuspocus|ysweet --url URL --pid SERVER_PID --label NAME
//!         --scenario typing|idle|ingest|load|put|join|gen-trace|gen-doc [options] [--out FILE]
//! ```
//!
//! Protocols: `native` is Chorus `/v1/ws` (URL `ws://host/v1/ws`); `yws` is the y-websocket
//! protocol with the document name appended to the URL (Chorus `ws://host/y`, the reference
//! server `ws://host`); `hocuspocus` prefixes every message with the document name and opens
//! with an auth message; `ysweet` asks y-sweet's document API (`URL` = `http://host:port`) to
//! create the document and hand out a client token, then speaks y-websocket to the URL it got.
//!
//! Latency is measured on one clock, the generator's: each writer edit gets the next clock of
//! the writer's yrs client, and its send instant is stored under that clock. A receiver reads
//! the state vector of every update it gets (which survives any merging the server does) and
//! every writer clock it newly covers is one delivery, timed from its send instant.
//! Server CPU comes from `/proc/PID/stat` (utime+stime), memory from `/proc/PID/status`.

use anyhow::{Context, bail};
use chorus_protocol::{ClientFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact, Update};

#[path = "loadgen/join.rs"]
mod join;
#[path = "loadgen/rawjoin.rs"]
mod rawjoin;

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

// ---------------------------------------------------------------------------------------------
// Flags

struct Args(HashMap<String, String>);

impl Args {
    fn parse() -> Self {
        let mut m = HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            if let Some(k) = k.strip_prefix("--") {
                m.insert(k.to_owned(), it.next().unwrap_or_default());
            }
        }
        Args(m)
    }
    fn s(&self, k: &str, d: &str) -> String {
        self.0.get(k).cloned().unwrap_or_else(|| d.to_owned())
    }
    fn n(&self, k: &str, d: f64) -> f64 {
        self.0.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
    }
}

// ---------------------------------------------------------------------------------------------
// lib0 encoding (y-websocket / Hocuspocus framing)

fn put_var(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_var(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn get_var(b: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    let mut shift = 0;
    loop {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        n |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(n);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

fn get_bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = get_var(b)? as usize;
    if b.len() < len {
        return None;
    }
    let (head, rest) = b.split_at(len);
    *b = rest;
    Some(head)
}

const EMPTY_UPDATE: &[u8] = &[0, 0];

// ---------------------------------------------------------------------------------------------
// Protocols

#[derive(Clone, Copy, PartialEq, Debug)]
enum Proto {
    Native,
    Yws,
    Hocuspocus,
    Ysweet,
}

/// What a received message means to the generator.
enum Got<'a> {
    /// The initial sync finished; carries the state it brought.
    Synced(&'a [u8]),
    Update(&'a [u8]),
    /// The server's sync step 1: answer with our (empty) state.
    Step1,
    /// Hocuspocus accepted our token.
    Authenticated,
    Other,
}

struct Target {
    proto: Proto,
    url: String,
    /// y-sweet: the WebSocket URL its token endpoint gave for each document. Behind an async
    /// lock so concurrent clients of one document create it once.
    ysweet_urls: tokio::sync::Mutex<HashMap<String, String>>,
    /// Bytes per socket read: small for many idle sockets, larger for a few big answers.
    read_buffer: usize,
}

impl Target {
    fn prefix(&self, doc: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if self.proto == Proto::Hocuspocus {
            put_bytes(&mut out, doc.as_bytes());
        }
        out
    }

    fn sync(&self, doc: &str, sub: u64, data: &[u8]) -> Message {
        if self.proto == Proto::Native {
            return native(&ClientFrame::Update {
                doc: doc.into(),
                update: data.to_vec(),
                seq: None,
            });
        }
        let mut out = self.prefix(doc);
        put_var(&mut out, 0);
        put_var(&mut out, sub);
        put_bytes(&mut out, data);
        Message::Binary(out.into())
    }

    fn update(&self, doc: &str, update: &[u8]) -> Message {
        self.sync(doc, 2, update)
    }

    fn awareness(&self, doc: &str, client: u64, clock: u64, json: &str) -> Message {
        let mut aw = Vec::with_capacity(64);
        put_var(&mut aw, 1);
        put_var(&mut aw, client);
        put_var(&mut aw, clock);
        put_bytes(&mut aw, json.as_bytes());
        if self.proto == Proto::Native {
            return native(&ClientFrame::Awareness {
                doc: doc.into(),
                update: aw,
            });
        }
        let mut out = self.prefix(doc);
        put_var(&mut out, 1);
        put_bytes(&mut out, &aw);
        Message::Binary(out.into())
    }

    /// Hocuspocus's token message (Auth 2 / Token 0), its clients' first; sync step 1 follows
    /// once authenticated.
    fn auth(&self, doc: &str) -> Message {
        let mut out = self.prefix(doc);
        put_var(&mut out, 2);
        put_var(&mut out, 0);
        put_bytes(&mut out, b"bench");
        Message::Binary(out.into())
    }

    /// Where to connect for `doc`.
    async fn ws_url(&self, doc: &str) -> anyhow::Result<String> {
        Ok(match self.proto {
            Proto::Native | Proto::Hocuspocus => self.url.clone(),
            Proto::Yws => format!("{}/{doc}", self.url),
            Proto::Ysweet => {
                let mut urls = self.ysweet_urls.lock().await;
                if let Some(u) = urls.get(doc) {
                    return Ok(u.clone());
                }
                let u = ysweet_token(&self.url, doc).await?;
                urls.insert(doc.to_owned(), u.clone());
                u
            }
        })
    }

    /// Opens a socket for `doc` and sends what a stock client sends first.
    async fn open(&self, doc: &str, ip: u8) -> anyhow::Result<Ws> {
        let url = self.ws_url(doc).await?;
        let mut ws = connect(&url, ip, self.read_buffer).await?;
        match self.proto {
            Proto::Native => {
                ws.send(native(&ClientFrame::Subscribe {
                    doc: doc.into(),
                    position: None,
                    state_vector: None,
                }))
                .await?
            }
            Proto::Hocuspocus => ws.send(self.auth(doc)).await?,
            Proto::Yws | Proto::Ysweet => ws.send(self.sync(doc, 0, &[0])).await?,
        }
        Ok(ws)
    }

    fn parse<'a>(&self, bytes: &'a [u8], scratch: &'a mut Vec<u8>) -> Got<'a> {
        if self.proto == Proto::Native {
            // The update bytes live in the decoded frame; copy them out once.
            return match ServerFrame::decode(bytes) {
                Ok(ServerFrame::Synced { update, .. }) => {
                    *scratch = update;
                    Got::Synced(scratch)
                }
                Ok(ServerFrame::Update { update, .. }) => {
                    *scratch = update;
                    Got::Update(scratch)
                }
                _ => Got::Other,
            };
        }
        let mut b = bytes;
        if self.proto == Proto::Hocuspocus && get_bytes(&mut b).is_none() {
            return Got::Other;
        }
        match get_var(&mut b) {
            // 4 is Hocuspocus's SyncReply: a sync message answering ours.
            Some(0 | 4) => match (get_var(&mut b), get_bytes(&mut b)) {
                (Some(0), _) => Got::Step1,
                (Some(1), Some(u)) => Got::Synced(u),
                (Some(2), Some(u)) => Got::Update(u),
                _ => Got::Other,
            },
            Some(2) if self.proto == Proto::Hocuspocus => match get_var(&mut b) {
                Some(2) => Got::Authenticated,
                _ => Got::Other,
            },
            _ => Got::Other,
        }
    }

    /// Answers what the protocol requires (sync step 1 → step 2; Hocuspocus auth → step 1).
    async fn answer(&self, ws: &mut Ws, doc: &str, got: &Got<'_>) -> anyhow::Result<()> {
        match got {
            Got::Step1 => ws.send(self.sync(doc, 1, EMPTY_UPDATE)).await?,
            Got::Authenticated => ws.send(self.sync(doc, 0, &[0])).await?,
            _ => {}
        }
        Ok(())
    }
}

fn native(f: &ClientFrame) -> Message {
    Message::Binary(f.encode().expect("encode").into())
}

/// y-sweet's document API: create the document, then ask for a client token. Returns the
/// WebSocket URL to open (with the token, if the server issued one).
async fn ysweet_token(base: &str, doc: &str) -> anyhow::Result<String> {
    let addr = host_port(base)?;
    let body = serde_json::json!({ "docId": doc, "doc": doc }).to_string();
    let created = json_post(addr, "/doc/new", &body).await?;
    anyhow::ensure!(created.status < 300, "y-sweet /doc/new: {}", created.status);
    let auth = json_post(addr, &format!("/doc/{doc}/auth"), "{}").await?;
    anyhow::ensure!(auth.status < 300, "y-sweet auth: {}", auth.status);
    let v = auth.json();
    let url = v["url"].as_str().context("token has no url")?.to_owned();
    let url = if url.ends_with("/ws") {
        // The y-websocket client appends the document name to the base URL.
        format!("{url}/{doc}")
    } else {
        url
    };
    Ok(match v["token"].as_str() {
        Some(t) => format!("{url}?token={t}"),
        None => url,
    })
}

async fn json_post(
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> std::io::Result<chorus_tests::http::Response> {
    chorus_tests::http::request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .await
}

fn host_port(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split("://").nth(1).context("URL without scheme")?;
    let hp = rest.split('/').next().unwrap_or(rest);
    Ok(hp.parse()?)
}

/// Connects from 127.0.0.`ip` so that tens of thousands of sockets (and their TIME_WAITs over
/// repeated runs) do not exhaust one source address's ephemeral ports.
async fn connect(url: &str, ip: u8, read_buffer: usize) -> anyhow::Result<Ws> {
    let addr = host_port(url)?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, ip.max(2)), 0)))?;
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        MaybeTlsStream::Plain(stream),
        Some(config),
    )
    .await?;
    Ok(ws)
}

// ---------------------------------------------------------------------------------------------
// Server process figures

#[derive(Clone, Copy)]
struct Proc {
    pid: u32,
}

impl Proc {
    /// utime + stime of the process, in seconds.
    fn cpu(&self) -> f64 {
        chorus_tests::process_cpu_seconds(self.pid)
    }

    fn rss_kb(&self) -> u64 {
        chorus_tests::process_rss_kb(self.pid)
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn emit(out: &str, line: serde_json::Value) {
    println!("RESULT {line}");
    if !out.is_empty() {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typing rooms (S1 and the fan-out target)

/// Send instants of one writer's edits, indexed by yrs clock (a ring: old slots get reused
/// long after any sane latency).
struct Sent {
    at_ns: Vec<AtomicU64>,
}
const RING: usize = 1 << 13;

impl Sent {
    fn new() -> Self {
        Sent {
            at_ns: (0..RING).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

struct Shared {
    t0: Instant,
    /// Writer client id → its send instants.
    writers: HashMap<u64, Arc<Sent>>,
    measuring: AtomicBool,
    stop: AtomicBool,
    deliveries: AtomicU64,
    lat_us: Mutex<Vec<u32>>,
    /// Multiplier on the base rates (×1000, so it fits an atomic).
    rate_milli: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

/// Highest clock (exclusive) per client among the items an update inserts. Not
/// `Update::state_vector`, which only counts updates that start at clock 0.
fn upper_clocks(u: &Update) -> Vec<(u64, u32)> {
    u.insertions(true)
        .iter()
        .filter_map(|(client, ranges)| Some((client.get(), ranges.iter().map(|r| r.end).max()?)))
        .collect()
}

/// Counts the writer clocks an update newly covers, timing each. A server delivers a
/// writer's edits in order (merged or not), so everything below the new upper bound arrived.
fn account(
    shared: &Shared,
    own: u64,
    seen: &mut HashMap<u64, u32>,
    update: &[u8],
    lats: &mut Vec<u32>,
) {
    let Ok(u) = Update::decode_v1(update) else {
        return;
    };
    let now = shared.now_ns();
    let measuring = shared.measuring.load(Ordering::Relaxed);
    for (client, clock) in upper_clocks(&u) {
        // Servers that echo a writer's edit back to it (the y-websocket family) do not get
        // to count that as a delivery.
        if client == own {
            continue;
        }
        let Some(sent) = shared.writers.get(&client) else {
            continue;
        };
        let from = seen.entry(client).or_insert(0);
        if clock <= *from {
            continue;
        }
        if measuring {
            for k in *from..clock {
                let at = sent.at_ns[k as usize % RING].load(Ordering::Relaxed);
                if at > 0 {
                    lats.push((now.saturating_sub(at) / 1000).min(u64::from(u32::MAX)) as u32);
                }
            }
            shared
                .deliveries
                .fetch_add(u64::from(clock - *from), Ordering::Relaxed);
        }
        *from = clock;
    }
}

/// Waits for the initial sync, answering the protocol on the way.
async fn until_synced(target: &Target, ws: &mut Ws, doc: &str) -> anyhow::Result<usize> {
    Ok(synced_state(target, ws, doc).await?.len())
}

/// Like [`until_synced`], returning the state the sync brought.
async fn synced_state(target: &Target, ws: &mut Ws, doc: &str) -> anyhow::Result<Vec<u8>> {
    let mut scratch = Vec::new();
    loop {
        let msg = ws.next().await.context("closed before sync")??;
        let Message::Binary(b) = msg else { continue };
        let got = target.parse(&b, &mut scratch);
        target.answer(ws, doc, &got).await?;
        if let Got::Synced(u) = got {
            return Ok(u.to_vec());
        }
    }
}

struct Client {
    doc: String,
    ws: Ws,
    writer: Option<(yrs::Doc, Arc<Sent>)>,
}

async fn client_loop(
    target: Arc<Target>,
    shared: Arc<Shared>,
    mut c: Client,
    chars_per_sec: f64,
    cursor_hz: f64,
) {
    let mut seen = HashMap::new();
    let mut lats = Vec::new();
    let mut scratch = Vec::new();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let base = |hz: f64, rng: &mut rand::rngs::StdRng| {
        let m = shared.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let period = 1.0 / (hz * m).max(1e-6);
        // ±20 % jitter so writers do not march in step.
        Duration::from_secs_f64(period * rng.random_range(0.8..1.2))
    };
    let writing = c.writer.is_some();
    let own = c.writer.as_ref().map_or(0, |(d, _)| d.client_id().get());
    let far = Instant::now() + Duration::from_secs(1 << 20);
    let mut next_edit = if writing && chars_per_sec > 0.0 {
        Instant::now() + base(chars_per_sec, &mut rng)
    } else {
        far
    };
    let mut next_cursor = if writing && cursor_hz > 0.0 {
        Instant::now() + base(cursor_hz, &mut rng)
    } else {
        far
    };
    let mut aw_clock = 0u64;
    let mut flush = tokio::time::interval(Duration::from_millis(200));
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            msg = c.ws.next() => {
                let Some(Ok(msg)) = msg else { break };
                if let Message::Binary(b) = msg {
                    let got = target.parse(&b, &mut scratch);
                    if let Got::Update(u) | Got::Synced(u) = got {
                        account(&shared, own, &mut seen, u, &mut lats);
                    } else if target.answer(&mut c.ws, &c.doc, &got).await.is_err() {
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(next_edit.into()) => {
                let Some((doc, sent)) = &c.writer else { break };
                let text = doc.get_or_insert_text("t");
                let update = {
                    let mut txn = doc.transact_mut();
                    let len = text.len(&txn);
                    let clock = txn.state_vector().get(&doc.client_id());
                    let at = if len == 0 { 0 } else { rng.random_range(0..=len) };
                    sent.at_ns[clock as usize % RING].store(shared.now_ns(), Ordering::Relaxed);
                    text.insert(&mut txn, at, "x");
                    txn.encode_update_v1()
                };
                if c.ws.send(target.update(&c.doc, &update)).await.is_err() {
                    break;
                }
                next_edit += base(chars_per_sec, &mut rng);
            }
            _ = tokio::time::sleep_until(next_cursor.into()) => {
                let id = c.writer.as_ref().map_or(0, |(d, _)| d.client_id().get());
                aw_clock += 1;
                let json = format!("{{\"cursor\":{{\"anchor\":{aw_clock},\"head\":{aw_clock}}},\"user\":\"w{id}\"}}");
                if c.ws.send(target.awareness(&c.doc, id, aw_clock, &json)).await.is_err() {
                    break;
                }
                next_cursor += base(cursor_hz, &mut rng);
            }
            _ = flush.tick() => {
                if !lats.is_empty() {
                    shared.lat_us.lock().expect("lock").append(&mut lats);
                }
            }
        }
    }
    let _ = c.ws.close(None).await;
}

async fn typing(target: Arc<Target>, a: &Args, server: Proc) -> anyhow::Result<()> {
    let docs = a.n("docs", 200.0) as usize;
    let per_doc = a.n("clients", 10.0) as usize;
    let writers = a.n("writers", 2.0) as usize;
    let cps = a.n("chars-per-sec", 5.0);
    let cursor_hz = a.n("cursor-hz", 2.0);
    let warmup = Duration::from_secs_f64(a.n("warmup", 3.0));
    let measure = Duration::from_secs_f64(a.n("measure", 8.0));
    let limit_ms = a.n("p99-limit-ms", 50.0);
    let steps: Vec<f64> = a
        .s("steps", "1")
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let name = a.s("name", "typing");
    let label = a.s("label", "server");
    let out = a.s("out", "");
    let prefix = a.s("doc-prefix", &format!("r{}", std::process::id()));

    // Writers' yrs clients and their clocks' send instants, known before anyone connects.
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut writer_docs = Vec::new();
    let mut map = HashMap::new();
    for _ in 0..docs * writers {
        let id: u64 = rng.random_range(1..(1u64 << 32));
        let sent = Arc::new(Sent::new());
        map.insert(id, sent.clone());
        writer_docs.push((yrs::Doc::with_client_id(id), sent));
    }
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        writers: map,
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        deliveries: AtomicU64::new(0),
        lat_us: Mutex::new(Vec::new()),
        rate_milli: AtomicU64::new((steps.first().copied().unwrap_or(1.0) * 1000.0) as u64),
    });

    // Connect and sync everyone first (64 at a time), then start typing.
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(64));
    let mut pending = Vec::new();
    let mut writer_docs = writer_docs.into_iter();
    for d in 0..docs {
        for i in 0..per_doc {
            let doc = format!("{prefix}-{d}");
            let writer = (i < writers).then(|| writer_docs.next()).flatten();
            let (target, sem) = (target.clone(), sem.clone());
            let ip = (2 + (d * per_doc + i) % 200) as u8;
            pending.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await?;
                let mut ws = target.open(&doc, ip).await?;
                until_synced(&target, &mut ws, &doc).await?;
                anyhow::Ok(Client { doc, ws, writer })
            }));
        }
    }
    let mut clients = Vec::new();
    for p in pending {
        clients.push(p.await??);
    }
    eprintln!(
        "{label}: {} clients synced in {:.1}s",
        clients.len(),
        started.elapsed().as_secs_f64()
    );
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(client_loop(
            target.clone(),
            shared.clone(),
            c,
            cps,
            cursor_hz,
        )));
    }

    println!(
        "{:<12} {:>6} {:>14} {:>14} {:>9} {:>9} {:>14}",
        "server", "rate×", "offered/s", "delivered/s", "p50 ms", "p99 ms", "cpu ms/1k"
    );
    let mut knee: Option<serde_json::Value> = None;
    let mut rows = Vec::new();
    for &m in &steps {
        shared
            .rate_milli
            .store((m * 1000.0) as u64, Ordering::Relaxed);
        tokio::time::sleep(warmup).await;
        shared.lat_us.lock().expect("lock").clear();
        shared.deliveries.store(0, Ordering::Relaxed);
        let cpu0 = server.cpu();
        shared.measuring.store(true, Ordering::Relaxed);
        let t = Instant::now();
        tokio::time::sleep(measure).await;
        shared.measuring.store(false, Ordering::Relaxed);
        let secs = t.elapsed().as_secs_f64();
        let cpu = server.cpu() - cpu0;
        // Let the last batches of latencies reach the shared vector.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = shared.deliveries.load(Ordering::Relaxed) as f64;
        let mut lats = std::mem::take(&mut *shared.lat_us.lock().expect("lock"));
        lats.sort_unstable();
        let offered = (docs * writers) as f64 * cps * m * (per_doc - 1) as f64;
        let row = serde_json::json!({
            "scenario": name, "server": label, "rate": m,
            "docs": docs, "clients_per_doc": per_doc, "writers_per_doc": writers,
            "offered_per_s": offered, "delivered_per_s": n / secs,
            "p50_ms": pct(&lats, 0.5), "p99_ms": pct(&lats, 0.99),
            "server_cpu_s": cpu, "cpu_ms_per_1k": if n > 0.0 { cpu * 1e6 / n } else { f64::NAN },
            "server_rss_kb": server.rss_kb(),
        });
        println!(
            "{:<12} {:>6} {:>14.0} {:>14.0} {:>9.2} {:>9.2} {:>14.2}",
            label,
            m,
            offered,
            n / secs,
            pct(&lats, 0.5),
            pct(&lats, 0.99),
            row["cpu_ms_per_1k"].as_f64().unwrap_or(f64::NAN)
        );
        let ok = pct(&lats, 0.99) <= limit_ms && n / secs >= 0.9 * offered;
        rows.push(row.clone());
        if ok {
            knee = Some(row);
        } else {
            break;
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let base = rows.first().cloned().unwrap_or_default();
    emit(
        &out,
        serde_json::json!({
            "scenario": name, "server": label,
            "knee_delivered_per_s": knee.as_ref().map(|k| k["delivered_per_s"].clone()),
            "base_p50_ms": base["p50_ms"], "base_p99_ms": base["p99_ms"],
            "base_cpu_ms_per_1k": base["cpu_ms_per_1k"],
            "base_delivered_per_s": base["delivered_per_s"],
            "steps": rows,
        }),
    );
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idle connections (S2)

async fn idle(target: Arc<Target>, a: &Args, server: Proc) -> anyhow::Result<()> {
    let n = a.n("connections", 19_000.0) as usize;
    let per_doc = a.n("clients", 10.0) as usize;
    let label = a.s("label", "server");
    let out = a.s("out", "");
    let prefix = a.s("doc-prefix", &format!("i{}", std::process::id()));
    // One connection first, so the baseline includes what any first client costs (a loaded
    // runtime, allocator arenas), not just an empty process.
    let mut warm = target.open(&format!("{prefix}-warm"), 2).await?;
    until_synced(&target, &mut warm, &format!("{prefix}-warm")).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = server.rss_kb();
    let sem = Arc::new(Semaphore::new(64));
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..n {
        let doc = format!("{prefix}-{}", i / per_doc);
        let (target, sem) = (target.clone(), sem.clone());
        pending.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let t = Instant::now();
            let mut ws = target.open(&doc, (2 + i % 250) as u8).await?;
            until_synced(&target, &mut ws, &doc).await?;
            anyhow::Ok((ws, t.elapsed()))
        }));
    }
    let mut socks = Vec::new();
    let mut lats = Vec::new();
    let mut failed = 0usize;
    let mut first_err = None;
    for p in pending {
        match p.await? {
            Ok((ws, d)) => {
                lats.push(d.as_micros() as u32);
                socks.push(ws);
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // Idle: keep reading (answering what the protocol asks), nothing sent.
    let reader = {
        let target = target.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for mut ws in socks {
                let target = target.clone();
                tasks.push(tokio::spawn(async move {
                    let mut scratch = Vec::new();
                    while let Some(Ok(Message::Binary(b))) = ws.next().await {
                        let got = target.parse(&b, &mut scratch);
                        if target.answer(&mut ws, "", &got).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            tasks
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(a.n("idle", 5.0))).await;
    let rss1 = server.rss_kb();
    lats.sort_unstable();
    let ok = lats.len();
    let per_conn = (rss1.saturating_sub(rss0) as f64 * 1024.0) / ok.max(1) as f64;
    println!(
        "{label}: {ok} idle connections ({failed} failed) in {connect_secs:.1}s; RSS {} → {} MB; {:.0} B/connection; connect→synced p50 {:.1} ms p99 {:.1} ms",
        rss0 / 1024,
        rss1 / 1024,
        per_conn,
        pct(&lats, 0.5),
        pct(&lats, 0.99)
    );
    if let Some(e) = &first_err {
        println!("{label}: first failure: {e}");
    }
    emit(
        &out,
        serde_json::json!({
            "scenario": "idle", "server": label, "connections": ok, "failed": failed,
            "rss_before_kb": rss0, "rss_after_kb": rss1, "bytes_per_connection": per_conn,
            "synced_p50_ms": pct(&lats, 0.5), "synced_p99_ms": pct(&lats, 0.99),
        }),
    );
    reader.abort();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Large documents (S3): a synthetic editing trace shaped like automerge-paper

/// One edit: insert `ch` at `pos`, or delete the character at `pos`.
enum Op {
    Ins(u32, u8),
    Del(u32),
}

/// Deterministic stand-in for the automerge-paper trace (259,778 single-character edits,
/// ~70 % inserts, ending near 105k characters): a cursor that types forward in runs,
/// backspaces in runs (~29 % of edits), and now and then jumps elsewhere in the text.
fn synthetic_trace(ops: usize) -> Vec<Op> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x00C0_FFEE);
    let mut len = 0u32;
    let mut cur = 0u32;
    let mut deleting = false;
    let mut out = Vec::with_capacity(ops);
    while out.len() < ops {
        let r: f64 = rng.random();
        if deleting {
            deleting = r >= 0.2;
        } else if r < 0.003 && len > 0 {
            cur = rng.random_range(0..=len);
            continue;
        } else {
            deleting = r < 0.083;
        }
        if deleting && cur > 0 {
            cur -= 1;
            len -= 1;
            out.push(Op::Del(cur));
        } else {
            out.push(Op::Ins(cur, b"etaoin shrdlu"[rng.random_range(0..13)]));
            cur += 1;
            len += 1;
        }
    }
    out
}

fn apply(doc: &yrs::Doc, text: &yrs::TextRef, op: &Op) -> Vec<u8> {
    let mut txn = doc.transact_mut();
    match op {
        Op::Ins(p, c) => text.insert(&mut txn, *p, std::str::from_utf8(&[*c]).unwrap_or("x")),
        Op::Del(p) => text.remove_range(&mut txn, *p, 1),
    }
    txn.encode_update_v1()
}

/// Builds the trace's document `copies` times over, each copy typed into its own root text
/// (`t`, `t1`, `t2`, …) so that building stays linear, and writes it as one v1 update.
fn gen_doc(a: &Args) -> anyhow::Result<()> {
    let copies = a.n("copies", 1.0) as u32;
    let ops = a.n("ops", 259_778.0) as usize;
    let file = a.s("file", "doc.bin");
    let trace = synthetic_trace(ops);
    let doc = yrs::Doc::with_client_id(7);
    let t = Instant::now();
    let mut chars = 0;
    for i in 0..copies {
        let text = doc.get_or_insert_text(if i == 0 {
            "t".to_owned()
        } else {
            format!("t{i}")
        });
        // One transaction per edit, as an editor makes them: yrs squashes adjacent typing
        // into one block when a transaction commits, and position lookups stay short.
        for op in &trace {
            let mut txn = doc.transact_mut();
            match op {
                Op::Ins(p, c) => {
                    text.insert(&mut txn, *p, std::str::from_utf8(&[*c]).unwrap_or("x"))
                }
                Op::Del(p) => text.remove_range(&mut txn, *p, 1),
            }
        }
        chars += text.len(&doc.transact());
    }
    let update = doc
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    std::fs::write(&file, &update)?;
    println!(
        "{file}: {copies}× {ops} edits → {chars} characters, {} bytes, built in {:.1}s",
        update.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Streams the trace as one update per edit from one writer while a reader waits for the
/// last edit: edits/s through the server. A server that has not delivered the last edit by
/// `--deadline` seconds is recorded as unfinished, with the share of inserts it had delivered.
async fn ingest(target: Arc<Target>, a: &Args, server: Proc) -> anyhow::Result<()> {
    let ops = a.n("ops", 259_778.0) as usize;
    let deadline = Duration::from_secs_f64(a.n("deadline", 180.0));
    let doc_name = a.s("doc", "large");
    let label = a.s("label", "server");
    let out = a.s("out", "");
    let trace = synthetic_trace(ops);
    let mut reader = target.open(&doc_name, 3).await?;
    until_synced(&target, &mut reader, &doc_name).await?;
    let mut w = target.open(&doc_name, 4).await?;
    until_synced(&target, &mut w, &doc_name).await?;
    let doc = yrs::Doc::with_client_id(4242);
    let text = doc.get_or_insert_text("t");
    let inserts = trace.iter().filter(|o| matches!(o, Op::Ins(..))).count() as u32;
    let cpu0 = server.cpu();
    let t = Instant::now();
    let (mut sink, mut wstream) = w.split();
    // The writer's socket must keep being read (acks, echoes) or the server stalls it.
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = wstream.next().await {} });
    let target2 = target.clone();
    let name2 = doc_name.clone();
    let writer = tokio::spawn(async move {
        for (i, op) in trace.iter().enumerate() {
            let u = apply(&doc, &text, op);
            sink.feed(target2.update(&name2, &u)).await?;
            if i % 64 == 63 {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        anyhow::Ok(sink)
    });
    let mut scratch = Vec::new();
    let mut seen = 0u32;
    let end = tokio::time::Instant::now() + deadline;
    while seen < inserts {
        let msg = match tokio::time::timeout_at(end, reader.next()).await {
            Err(_) => break,
            Ok(msg) => msg.context("reader closed")??,
        };
        let Message::Binary(b) = msg else { continue };
        if let Got::Update(u) | Got::Synced(u) = target.parse(&b, &mut scratch)
            && let Ok(u) = Update::decode_v1(u)
        {
            for (c, k) in upper_clocks(&u) {
                if c == 4242 {
                    seen = seen.max(k);
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = server.cpu() - cpu0;
    let finished = seen >= inserts;
    if finished {
        let _ = writer.await;
    } else {
        writer.abort();
    }
    drain.abort();
    let done_pct = 100.0 * f64::from(seen) / f64::from(inserts.max(1));
    if finished {
        println!(
            "{label}: ingested {ops} edits in {secs:.2}s = {:.0} edits/s, server CPU {cpu:.2}s, RSS {} MB",
            ops as f64 / secs,
            server.rss_kb() / 1024
        );
    } else {
        println!(
            "{label}: did not deliver the last edit within {secs:.0}s: {done_pct:.1} % of the inserts \
             arrived, server CPU {cpu:.2}s, RSS {} MB",
            server.rss_kb() / 1024
        );
    }
    emit(
        &out,
        serde_json::json!({
            "scenario": "ingest", "server": label, "edits": ops, "seconds": secs,
            // Unfinished: no rate (the share delivered says how far it got).
            "edits_per_s": finished.then(|| ops as f64 / secs), "done_pct": done_pct,
            "server_cpu_s": cpu, "server_rss_kb": server.rss_kb(),
        }),
    );
    Ok(())
}

/// Puts a prebuilt document (`--file`) into the server as one update and waits until a
/// second client sees it.
async fn put(target: Arc<Target>, a: &Args) -> anyhow::Result<()> {
    let doc_name = a.s("doc", "large100");
    let update = std::fs::read(a.s("file", "doc.bin"))?;
    let sv = Update::decode_v1(&update)?.state_vector();
    let mut w = target.open(&doc_name, 4).await?;
    until_synced(&target, &mut w, &doc_name).await?;
    w.send(target.update(&doc_name, &update)).await?;
    let mut r = target.open(&doc_name, 5).await?;
    let mut scratch = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), r.next())
            .await
            .context("put: not seen within 120 s")?
            .context("closed")??;
        let Message::Binary(b) = msg else { continue };
        let got = target.parse(&b, &mut scratch);
        if let Got::Update(u) | Got::Synced(u) = &got
            && let Ok(u) = Update::decode_v1(u)
            && u.state_vector() == sv
        {
            break;
        }
        target.answer(&mut r, &doc_name, &got).await?;
    }
    // Give servers that persist on a debounce time to write it (y-sweet: 10 s checkpoints).
    tokio::time::sleep(Duration::from_secs_f64(a.n("settle", 1.0))).await;
    println!("put {} bytes into {doc_name}", update.len());
    Ok(())
}

/// Cold load: a fresh client syncs a document the (just restarted) server has not loaded.
/// With `--file F` (the document that was put) or `--ops N` (the trace's document) the load
/// knows how many characters the whole document holds and ends once they have arrived.
async fn load(target: Arc<Target>, a: &Args, server: Proc) -> anyhow::Result<()> {
    let doc_name = a.s("doc", "large");
    let label = a.s("label", "server");
    let out = a.s("out", "");
    let file = a.s("file", "");
    let expect = if !file.is_empty() {
        Some(check_doc(&std::fs::read(&file)?))
    } else {
        let ops = a.n("ops", 0.0) as usize;
        (ops > 0).then(|| {
            synthetic_trace(ops)
                .iter()
                .map(|op| match op {
                    Op::Ins(..) => 1isize,
                    Op::Del(..) => -1,
                })
                .sum::<isize>()
                .max(0) as usize
        })
    };
    let rss0 = server.rss_kb();
    let t = Instant::now();
    let mut ws = target.open(&doc_name, 6).await?;
    let state = synced_state(&target, &mut ws, &doc_name).await?;
    let mut secs = t.elapsed().as_secs_f64();
    let mut parts = vec![state];
    // A server may answer before its persistence layer has loaded the document (the
    // reference server's LevelDB binding does) and send the content as updates afterwards:
    // the load ends once the whole document has arrived, or after `--quiet-ms` (1.5 s) with
    // no content. Completeness is checked only in pauses of `PAUSE`, so that checking (which
    // applies everything received to a document) never delays seeing the next message.
    const PAUSE: Duration = Duration::from_millis(500);
    let mut scratch = Vec::new();
    let quiet = Duration::from_millis(a.n("quiet-ms", 1500.0) as u64);
    // Only content moves `last_content`: keepalives (Chorus sends one every 15 s on a quiet
    // y-websocket socket) must not keep the load open forever.
    let mut last_content = Instant::now();
    loop {
        let msg = match tokio::time::timeout(PAUSE, ws.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(_) => break,
            Err(_) => {
                let complete = || {
                    expect.is_some_and(|n| {
                        yrs::merge_updates_v1(parts.iter().map(Vec::as_slice))
                            .is_ok_and(|s| check_doc(&s) >= n)
                    })
                };
                if last_content.elapsed() >= quiet || complete() {
                    break;
                }
                continue;
            }
        };
        let Message::Binary(b) = msg else { continue };
        let got = target.parse(&b, &mut scratch);
        if let Got::Update(u) | Got::Synced(u) = &got {
            parts.push(u.to_vec());
            secs = t.elapsed().as_secs_f64();
            last_content = Instant::now();
        }
        target.answer(&mut ws, &doc_name, &got).await?;
    }
    let state = yrs::merge_updates_v1(parts.iter().map(Vec::as_slice))?;
    let bytes = state.len();
    // The synced state must really be the document (not empty because nothing persisted).
    let chars = check_doc(&state);
    let rss1 = server.rss_kb();
    println!(
        "{label}: {doc_name} synced from cold in {:.1} ms ({bytes} bytes, {chars} characters); RSS {} → {} MB",
        secs * 1000.0,
        rss0 / 1024,
        rss1 / 1024
    );
    emit(
        &out,
        serde_json::json!({
            "scenario": format!("load:{doc_name}"), "server": label, "ms": secs * 1000.0,
            "bytes": bytes, "characters": chars, "expected_characters": expect,
            "rss_before_kb": rss0, "rss_after_kb": rss1,
        }),
    );
    Ok(())
}

/// Characters in every root text of a document state (0 if it does not decode). Roots made
/// by an update have no type until someone asks for one, so each is asked for as text.
fn check_doc(update: &[u8]) -> usize {
    let doc = yrs::Doc::new();
    if let Ok(u) = Update::decode_v1(update) {
        let _ = doc.transact_mut().apply_update(u);
    }
    let names: Vec<String> = doc
        .transact()
        .root_refs()
        .map(|(name, _)| name.to_string())
        .collect();
    names
        .iter()
        .map(|n| {
            let text = doc.get_or_insert_text(n.as_str());
            text.get_string(&doc.transact()).len()
        })
        .sum()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let scenario = a.s("scenario", "typing");
    if scenario == "gen-doc" {
        return gen_doc(&a);
    }
    if scenario == "check" {
        let n = check_doc(&std::fs::read(a.s("file", "doc.bin"))?);
        println!("{n} characters");
        return Ok(());
    }
    let proto = match a.s("proto", "yws").as_str() {
        "native" => Proto::Native,
        "yws" => Proto::Yws,
        "hocuspocus" => Proto::Hocuspocus,
        "ysweet" => Proto::Ysweet,
        p => bail!("unknown --proto {p}"),
    };
    let target = Arc::new(Target {
        proto,
        url: a.s("url", "ws://127.0.0.1:8080/y"),
        ysweet_urls: tokio::sync::Mutex::new(HashMap::new()),
        // Small buffers: a generator holding 19k sockets must not be the one that runs out;
        // joiners each read a whole document.
        read_buffer: if scenario == "join" { 64 * 1024 } else { 4096 },
    });
    let server = Proc {
        pid: a.n("pid", 0.0) as u32,
    };
    match scenario.as_str() {
        "typing" => typing(target, &a, server).await,
        "idle" => idle(target, &a, server).await,
        "ingest" => ingest(target, &a, server).await,
        "put" => put(target, &a).await,
        "load" => load(target, &a, server).await,
        "join" => join::join(target, &a, server).await,
        s => bail!("unknown --scenario {s}"),
    }
}
