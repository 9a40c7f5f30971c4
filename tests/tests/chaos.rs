//! Chaos: one document edited at once by native clients, stock Yjs clients (y-websocket in
//! Node) and an HTTP writer, spread over three `chorus` processes on one Redis (AOF,
//! `appendfsync always`), while a seeded schedule drops client sockets, kills nodes with
//! SIGKILL (restarting them on the same address) and kills and restarts Redis on its AOF. The
//! nodes compact and trim all along (`--compact-entries 20`, `--replay-window 10s`), so some
//! resumes replay and others fall back to a state-vector sync.
//!
//! Every client inserts unique tokens (`[n3-17]` native, `[s2-5]` stock, `[h-9]` HTTP) at the
//! end of its own view of the text. What counts as acknowledged: a native `ack`, an HTTP 200,
//! or a token once seen in a fresh read from a node (the only acknowledgement a stock client
//! has: a node serves nothing it has not read back from the log). When the faults stop, every
//! native client reconnects and resends its whole state until it is acked, the HTTP writer
//! posts until it gets a 200, and then:
//! - every client (native, stock) and every node serves the same text,
//! - every acknowledged token is in a fresh client's view on every node: lost must be 0,
//! - the text is made of whole written tokens, each once, and
//! - no native client ever held an update it could not integrate: nodes send only log
//!   entries in log order, so one that waits for missing dependencies means the log holds an
//!   entry without what it builds on (and that client's whole-state resends, carrying the gap,
//!   would be refused).
//!
//! It ends with a figures line: `chaos figures: seed=… written=… acked=… lost=0 converge=…`.
//!
//! ```sh
//! # short form, run by `cargo test` / scripts/test.sh: 30 s of faults, 20 WebSocket clients
//! cargo build -p chorus-server --bin chorus
//! cargo test -p chorus-tests --test chaos -- --nocapture
//! # long form by hand: 5 minutes, 40 WebSocket clients (the knobs below override it too)
//! cargo test --release -p chorus-tests --test chaos chaos_long -- --ignored --nocapture
//! # knobs (both forms): replay a run by its seed, or change its length and size
//! CHAOS_SEED=42 CHAOS_SECONDS=120 CHAOS_CLIENTS=30 cargo test -p chorus-tests --test chaos -- --nocapture
//! # narrowing a failure down: only some kinds of fault (drops, nodes, redis), or none, and
//! # Redis restarted every N seconds (default 60)
//! CHAOS_SEED=42 CHAOS_FAULTS=drops,redis CHAOS_REDIS_EVERY=5 cargo test -p chorus-tests --test chaos -- --nocapture
//! ```
//!
//! The seed fixes the fault schedule and every client's choices (nodes, pauses); thread timing
//! still varies from run to run, so a seed reproduces the pressure rather than the exact
//! interleaving.

use chorus_protocol::{ClientFrame, ErrorCode, Position, ServerFrame};
use chorus_tests::multinode::node_text;
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::redis::RedisServer;
use chorus_tests::stock::StockClient;
use chorus_tests::{DEADLINE, ServerProcess, http};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use yrs::{ReadTxn, StateVector, Text, Transact};

const DOC: &str = "chaos";
const NODES: usize = 3;

/// How long the clients get, once the faults stop, to reconnect, finish and converge.
const FINISH: Duration = Duration::from_secs(60);

/// A client's pause before trying again (a failed connect, an `append_failed`).
const RETRY: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    run(Knobs::from_env(Defaults {
        seconds: 30,
        clients: 20,
        faults: ALL_FAULTS,
        redis_every: 60,
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: cargo test --release -p chorus-tests --test chaos chaos_long -- --ignored --nocapture"]
async fn chaos_long() {
    run(Knobs::from_env(Defaults {
        seconds: 300,
        clients: 40,
        faults: ALL_FAULTS,
        redis_every: 60,
    }))
    .await;
}

/// The narrowed-down form of what `chaos_short` found now and then: Redis restarted every
/// 3 s under 12 clients, and nothing else. Right after Redis comes back a node appends an
/// update whose dependencies never reached the log (so every node holds it pending, and
/// clients that receive it hold it pending too: their whole-state resends then carry a gap
/// and are refused as `bad_update`). Ignored until the server is fixed:
/// `cargo test -p chorus-tests --test chaos redis_restarts -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "reproduces a server bug (an entry appended without its dependencies after a Redis restart)"]
async fn redis_restarts_leave_no_entry_without_its_dependencies() {
    run(Knobs::from_env(Defaults {
        seconds: 30,
        clients: 12,
        faults: "redis",
        redis_every: 3,
    }))
    .await;
}

const ALL_FAULTS: &str = "drops,nodes,redis";

/// A test's size when the environment does not say otherwise (see [`Knobs`]).
struct Defaults {
    seconds: u64,
    clients: usize,
    faults: &'static str,
    redis_every: u64,
}

/// The run's size; the environment overrides the defaults.
struct Knobs {
    seed: u64,
    seconds: u64,
    /// WebSocket clients, three fifths native and two fifths stock (the HTTP writer comes on top).
    clients: usize,
    /// Which kinds of fault to inject (`CHAOS_FAULTS=drops,nodes,redis`, the default: all;
    /// `none` runs the load alone), for narrowing a failure down.
    faults: Vec<String>,
    /// Seconds between Redis restarts (`CHAOS_REDIS_EVERY`; at least one restart per run).
    redis_every: u64,
}

impl Knobs {
    fn from_env(d: Defaults) -> Self {
        let num = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
            })
        };
        let k = Knobs {
            seed: num("CHAOS_SEED").unwrap_or_else(rand::random),
            seconds: num("CHAOS_SECONDS").unwrap_or(d.seconds),
            clients: num("CHAOS_CLIENTS").map_or(d.clients, |c| c as usize),
            faults: std::env::var("CHAOS_FAULTS")
                .unwrap_or_else(|_| d.faults.into())
                .split(',')
                .map(|f| f.trim().to_string())
                .collect(),
            redis_every: num("CHAOS_REDIS_EVERY").unwrap_or(d.redis_every).max(1),
        };
        for f in &k.faults {
            assert!(
                ["drops", "nodes", "redis", "none"].contains(&f.as_str()),
                "CHAOS_FAULTS: {f:?} is none of drops, nodes, redis, none"
            );
        }
        assert!(
            k.clients >= 2,
            "CHAOS_CLIENTS: at least one of each protocol"
        );
        assert!(k.seconds >= 5, "CHAOS_SECONDS: at least 5");
        k
    }
}

async fn run(knobs: Knobs) {
    let wall = Instant::now();
    // Printed first, so a run that hangs or panics can still be replayed.
    eprintln!(
        "chaos: seed={} seconds={} clients={} faults={} (replay with CHAOS_SEED={})",
        knobs.seed,
        knobs.seconds,
        knobs.clients,
        knobs.faults.join(","),
        knobs.seed
    );
    let mut rng = StdRng::seed_from_u64(knobs.seed);
    let cluster = Cluster::start().await;
    let addrs = cluster.addrs.clone();
    let n_stock = knobs.clients * 2 / 5;
    let n_native = knobs.clients - n_stock;
    let drops: Arc<Vec<AtomicBool>> =
        Arc::new((0..knobs.clients).map(|_| AtomicBool::new(false)).collect());
    let writing = CancellationToken::new();
    let seen = Arc::new(Mutex::new(BTreeSet::new()));

    let natives: Vec<_> = (0..n_native)
        .map(|i| {
            let c = Native::new(i, &addrs, StdRng::seed_from_u64(rng.random()), wall);
            tokio::spawn(c.run(writing.clone(), drops.clone()))
        })
        .collect();
    let stocks: Vec<_> = (0..n_stock)
        .map(|i| {
            let c = Stock::new(i, n_native + i, &addrs, StdRng::seed_from_u64(rng.random()));
            tokio::spawn(c.run(writing.clone(), drops.clone()))
        })
        .collect();
    let writer = HttpWriter::new(&addrs, StdRng::seed_from_u64(rng.random()));
    let writer = tokio::spawn(writer.run(writing.clone()));
    let observer = tokio::spawn(observe(
        addrs.clone(),
        StdRng::seed_from_u64(rng.random()),
        writing.clone(),
        seen.clone(),
    ));

    let mut faults = schedule(&mut rng, &knobs);
    faults.retain(|(_, f)| knobs.faults.iter().any(|k| k == f.kind()));
    let counts = FaultCounts::of(&faults);
    let span = Duration::from_secs(knobs.seconds);
    let cluster = inject(cluster, faults, span, drops.clone()).await;

    // Faults over: every node and Redis are up. Clients stop writing new tokens and finish.
    let stopped = Instant::now();
    let mut acked_during_faults = seen.lock().expect("seen").clone();
    writing.cancel();
    let mut natives_done = Vec::new();
    for t in natives {
        natives_done.push(t.await.expect("native client task"));
    }
    let mut stocks_done = Vec::new();
    for t in stocks {
        stocks_done.push(t.await.expect("stock client task"));
    }
    let writer = writer.await.expect("HTTP writer task");
    let observer_reads = observer.await.expect("observer task");

    // What must survive: every native ack, every HTTP 200, every token a node once served.
    let mut acked: BTreeSet<String> = seen.lock().expect("seen").clone();
    for n in &natives_done {
        acked.extend(n.acked_tokens());
    }
    acked.extend(writer.acked_tokens());
    let written: usize = natives_done.iter().map(|n| n.tokens.len()).sum::<usize>()
        + stocks_done.iter().map(|s| s.tokens.len()).sum::<usize>()
        + writer.tokens.len();
    for n in &natives_done {
        let by = stopped - wall;
        acked_during_faults.extend(n.acked_tokens_by(by));
    }
    acked_during_faults.extend(writer.tokens[..writer.acked_during_faults].iter().cloned());

    let converged = converge(&mut natives_done, &mut stocks_done, &addrs, &acked).await;
    let converge_time = stopped.elapsed();

    // A fresh client on every node, over both read paths.
    let mut lost = BTreeSet::new();
    let mut final_text = None;
    for &addr in &addrs {
        let mut fresh = NativeClient::connect(&format!("ws://{addr}/v1/ws")).await;
        fresh.subscribe_synced(DOC).await;
        let over_ws = fresh.text(DOC);
        let over_http = node_text(addr, DOC).await.unwrap_or_default();
        for t in &acked {
            if !over_ws.contains(t.as_str()) || !over_http.contains(t.as_str()) {
                eprintln!(
                    "chaos: LOST {t} on {addr} (fresh native view has it: {}, HTTP GET has it: {})",
                    over_ws.contains(t.as_str()),
                    over_http.contains(t.as_str())
                );
                lost.insert(t.clone());
            }
        }
        final_text.get_or_insert(over_ws);
    }

    for n in &natives_done {
        eprintln!("chaos: {}", n.summary());
    }
    for s in &stocks_done {
        eprintln!("chaos: {}", s.summary());
    }
    eprintln!("chaos: {}", writer.summary());
    eprintln!("chaos: observer read the document {observer_reads} times");
    eprintln!(
        "chaos figures: seed={} seconds={} clients={} (native {n_native}, stock {n_stock}, http 1) \
         faults: drops={} node_kills={} redis_restarts={} | written={written} acked={} \
         (during faults {}) lost={} | converge={:.1}s wall={:.1}s",
        knobs.seed,
        knobs.seconds,
        knobs.clients,
        counts.drops,
        counts.node_kills,
        counts.redis_restarts,
        acked.len(),
        acked_during_faults.len(),
        lost.len(),
        converge_time.as_secs_f64(),
        wall.elapsed().as_secs_f64(),
    );
    if let Err(why) = &converged {
        eprintln!("chaos: NO CONVERGENCE: {why}");
    }
    if !lost.is_empty() {
        explain_loss(&cluster, &natives_done, &lost).await;
    }
    assert!(
        lost.is_empty(),
        "seed {}: {} acknowledged tokens lost: {lost:?}",
        knobs.seed,
        lost.len()
    );
    if let Err(why) = converged {
        panic!("seed {}: no convergence: {why}", knobs.seed);
    }
    // Whole tokens only, each once: an insert landing inside another token would show here.
    let text = final_text.expect("three nodes");
    let all_written: BTreeSet<&String> = natives_done
        .iter()
        .flat_map(|n| &n.tokens)
        .chain(stocks_done.iter().flat_map(|s| &s.tokens))
        .chain(&writer.tokens)
        .collect();
    let in_text: Vec<String> = tokens_in(&text).collect();
    let unknown: Vec<&String> = in_text
        .iter()
        .filter(|t| !all_written.contains(t))
        .collect();
    assert!(
        unknown.is_empty(),
        "text holds tokens nobody wrote: {unknown:?}"
    );
    assert_eq!(
        in_text.len(),
        in_text.iter().collect::<BTreeSet<_>>().len(),
        "every token is in the text once"
    );
    let pending: Vec<String> = natives_done
        .iter()
        .flat_map(|n| n.pending.iter().cloned())
        .collect();
    if !pending.is_empty() {
        let mut ids: Vec<String> = natives_done
            .iter_mut()
            .map(|n| {
                let id = n.yrs_client();
                format!("{}={id}", n.name)
            })
            .collect();
        ids.extend(
            stocks_done
                .iter()
                .map(|s| format!("{}={:?}", s.name, s.yrs_clients)),
        );
        ids.push(format!("h={}", writer.doc.client_id()));
        eprintln!("chaos: writers' yrs client ids: {}", ids.join(" "));
    }
    assert!(
        pending.is_empty(),
        "seed {}: clients received updates they could not integrate (a log entry whose \
         dependencies are not in the log), {} times: {pending:?}",
        knobs.seed,
        pending.len()
    );
    let unexpected: Vec<&String> = natives_done.iter().flat_map(|n| &n.unexpected).collect();
    assert!(
        unexpected.is_empty(),
        "seed {}: errors no fault explains: {unexpected:?}",
        knobs.seed
    );
    drop(cluster);
}

/// Redis and the nodes, with what it takes to restart each where it was.
struct Cluster {
    redis: RedisServer,
    nodes: Vec<Option<ServerProcess>>,
    addrs: Vec<SocketAddr>,
    dirs: Vec<tempfile::TempDir>,
    args: Vec<String>,
    snapshots: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let redis = RedisServer::start().await;
        let snapshots = tempfile::tempdir().expect("tempdir");
        let args: Vec<String> = [
            "--redis-url",
            &redis.url(),
            "--snapshot-dir",
            snapshots.path().to_str().expect("utf-8 path"),
            // Compaction (snapshot + trim) every few dozen entries, trimming all but the last
            // 10 s (the least a shared log accepts): later resumes meet trimmed positions.
            "--compact-entries",
            "20",
            "--replay-window",
            "10s",
            // Appends fail fast while Redis is away, so clients retry within the run.
            "--redis-timeout",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut c = Cluster {
            redis,
            nodes: Vec::new(),
            addrs: Vec::new(),
            dirs: Vec::new(),
            args,
            snapshots,
        };
        for _ in 0..NODES {
            let dir = tempfile::tempdir().expect("tempdir");
            let node = ServerProcess::spawn(dir.path(), &c.arg_refs()).await;
            c.addrs.push(node.addr);
            c.nodes.push(Some(node));
            c.dirs.push(dir);
        }
        c
    }

    fn arg_refs(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    async fn kill_node(&mut self, i: usize) {
        self.nodes[i].take().expect("node is up").kill9().await;
    }

    async fn restart_node(&mut self, i: usize) {
        let args = self.arg_refs();
        let node = ServerProcess::spawn_at(self.addrs[i], self.dirs[i].path(), &args).await;
        self.nodes[i] = Some(node);
    }
}

#[derive(Debug)]
enum Fault {
    /// Client `i` loses its socket (native: dropped, then resumes; stock: the process is
    /// killed and a new client starts).
    DropSocket(usize),
    /// SIGKILL, down for a while, restarted on the same address and data.
    KillNode { node: usize, down: Duration },
    /// SIGKILL, down for a while, restarted on its AOF.
    RestartRedis { down: Duration },
}

/// The run's faults, from the seed: about two socket drops a second, a node kill every 15 s
/// and a Redis restart every `redis_every` (at least one of each; a single Redis restart falls
/// in the middle third).
fn schedule(rng: &mut StdRng, knobs: &Knobs) -> Vec<(Duration, Fault)> {
    let (seconds, clients) = (knobs.seconds, knobs.clients);
    let span = Duration::from_secs(seconds);
    let at = |rng: &mut StdRng, from: f64, to: f64| span.mul_f64(rng.random_range(from..to));
    let mut faults = Vec::new();
    let redis_restarts = (seconds / knobs.redis_every).max(1);
    let (from, to) = if redis_restarts == 1 {
        (0.3, 0.7)
    } else {
        (0.05, 0.9)
    };
    for _ in 0..redis_restarts {
        let t = at(rng, from, to);
        let down = Duration::from_millis(rng.random_range(300..1500));
        faults.push((t, Fault::RestartRedis { down }));
    }
    for _ in 0..(seconds / 15).max(1) {
        let t = at(rng, 0.05, 0.9);
        let node = rng.random_range(0..NODES);
        let down = Duration::from_millis(rng.random_range(300..1500));
        faults.push((t, Fault::KillNode { node, down }));
    }
    for _ in 0..seconds * 2 {
        let t = at(rng, 0.0, 1.0);
        faults.push((t, Fault::DropSocket(rng.random_range(0..clients))));
    }
    faults.sort_by_key(|(t, _)| *t);
    faults
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::DropSocket(_) => "drops",
            Fault::KillNode { .. } => "nodes",
            Fault::RestartRedis { .. } => "redis",
        }
    }
}

struct FaultCounts {
    drops: usize,
    node_kills: usize,
    redis_restarts: usize,
}

impl FaultCounts {
    fn of(faults: &[(Duration, Fault)]) -> Self {
        let count = |f: fn(&Fault) -> bool| faults.iter().filter(|(_, x)| f(x)).count();
        FaultCounts {
            drops: count(|f| matches!(f, Fault::DropSocket(_))),
            node_kills: count(|f| matches!(f, Fault::KillNode { .. })),
            redis_restarts: count(|f| matches!(f, Fault::RestartRedis { .. })),
        }
    }
}

/// Runs the schedule (one fault at a time: a fault that falls inside a node's or Redis's
/// down time waits for it to come back) and returns with everything up, `span` after the start
/// at the earliest.
async fn inject(
    mut cluster: Cluster,
    faults: Vec<(Duration, Fault)>,
    span: Duration,
    drops: Arc<Vec<AtomicBool>>,
) -> Cluster {
    let start = Instant::now();
    for (at, fault) in faults {
        // Pacing the schedule, not waiting for an outcome.
        tokio::time::sleep_until(start + at).await;
        let t = start.elapsed().as_secs_f64();
        match fault {
            Fault::DropSocket(i) => drops[i].store(true, Ordering::Relaxed),
            Fault::KillNode { node, down } => {
                eprintln!("chaos: {t:6.1}s kill -9 node {node}, down {down:?}");
                cluster.kill_node(node).await;
                tokio::time::sleep(down).await;
                cluster.restart_node(node).await;
                eprintln!(
                    "chaos: {:6.1}s node {node} is back",
                    start.elapsed().as_secs_f64()
                );
            }
            Fault::RestartRedis { down } => {
                eprintln!("chaos: {t:6.1}s kill -9 redis, down {down:?}");
                cluster.redis.kill9().await;
                tokio::time::sleep(down).await;
                cluster.redis.restart().await;
                eprintln!(
                    "chaos: {:6.1}s redis is back",
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    tokio::time::sleep_until(start + span).await;
    cluster
}

fn pick(rng: &mut StdRng, addrs: &[SocketAddr]) -> SocketAddr {
    addrs[rng.random_range(0..addrs.len())]
}

/// The tokens in a text, in order (tokens never nest: every insert lands after a `]`).
fn tokens_in(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split('[')
        .skip(1)
        .filter_map(|s| s.split_once(']').map(|(t, _)| format!("[{t}]")))
}

/// A native client that reconnects to a random node whenever its socket goes, resumes from
/// its last position, and sends its whole state again whenever something it sent may not
/// have been appended (a socket gone with updates in flight, `append_failed`, ...). Between
/// such recoveries it sends only its own new items.
struct Native {
    name: String,
    index: usize,
    addrs: Vec<SocketAddr>,
    rng: StdRng,
    client: Option<NativeClient>,
    /// The local document and resume position while no socket holds them.
    docs: HashMap<String, yrs::Doc>,
    positions: HashMap<String, Position>,
    /// The node the socket is on.
    node: Option<SocketAddr>,
    start: Instant,
    tokens: Vec<String>,
    /// Per token, its first acknowledgement.
    acks: Vec<Option<AckRecord>>,
    /// Tokens inserted since the last update sent.
    unsent: Vec<usize>,
    /// seq → the tokens that update carries.
    inflight: HashMap<u64, Vec<usize>>,
    /// This client's own clock at the last update sent.
    sent_clock: u32,
    /// `Some(t)`: send the whole state at `t`, and nothing else until it is acked.
    resend_at: Option<Instant>,
    resend_seq: Option<u64>,
    next_seq: u64,
    connects: usize,
    drops: usize,
    closes: BTreeMap<String, usize>,
    errors: BTreeMap<&'static str, usize>,
    unexpected: Vec<String>,
    /// Whether the local document holds an update it could not integrate, and each time it
    /// started to.
    holding_pending: bool,
    pending: Vec<String>,
}

impl Native {
    fn new(i: usize, addrs: &[SocketAddr], rng: StdRng, start: Instant) -> Self {
        Native {
            name: format!("n{i}"),
            index: i,
            addrs: addrs.to_vec(),
            rng,
            client: None,
            docs: HashMap::new(),
            positions: HashMap::new(),
            node: None,
            start,
            tokens: Vec::new(),
            acks: Vec::new(),
            unsent: Vec::new(),
            inflight: HashMap::new(),
            sent_clock: 0,
            resend_at: None,
            resend_seq: None,
            next_seq: 1,
            connects: 0,
            drops: 0,
            closes: BTreeMap::new(),
            errors: BTreeMap::new(),
            unexpected: Vec::new(),
            holding_pending: false,
            pending: Vec::new(),
        }
    }

    async fn run(mut self, writing: CancellationToken, drops: Arc<Vec<AtomicBool>>) -> Self {
        while !writing.is_cancelled() {
            if drops[self.index].swap(false, Ordering::Relaxed) && self.client.is_some() {
                self.drops += 1;
                self.disconnect();
            }
            self.step(true).await;
        }
        let until = Instant::now() + FINISH;
        while self.client.is_none() || self.acks.iter().any(Option::is_none) {
            assert!(
                Instant::now() < until,
                "{}: {} tokens still unacknowledged {FINISH:?} after the faults stopped ({})",
                self.name,
                self.acks.iter().filter(|a| a.is_none()).count(),
                self.summary()
            );
            self.step(false).await;
        }
        self
    }

    /// Connects if needed, inserts a token (when `write`), sends, reads for a random pause.
    async fn step(&mut self, write: bool) {
        if self.client.is_none() {
            self.reconnect().await;
        }
        if write {
            self.insert_token();
        }
        self.send_pending().await;
        let pace = Duration::from_millis(self.rng.random_range(100..300));
        self.read_for(pace).await;
    }

    fn insert_token(&mut self) {
        let token = format!("[{}-{}]", self.name, self.tokens.len());
        let d = self.client.as_mut().expect("connected").doc(DOC);
        let t = d.get_or_insert_text("t");
        let mut txn = d.transact_mut();
        let end = t.len(&txn);
        t.insert(&mut txn, end, &token);
        self.unsent.push(self.tokens.len());
        self.tokens.push(token);
        self.acks.push(None);
    }

    async fn send_pending(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let d = c.doc(DOC);
        let me = d.client_id();
        let (update, covers) = if let Some(at) = self.resend_at {
            let unacked: Vec<usize> = (0..self.tokens.len())
                .filter(|&i| self.acks[i].is_none())
                .collect();
            if unacked.is_empty() {
                self.resend_at = None;
                return;
            }
            if self.resend_seq.is_some() || Instant::now() < at {
                return;
            }
            self.resend_seq = Some(self.next_seq);
            let update = d
                .transact()
                .encode_state_as_update_v1(&StateVector::default());
            (update, unacked)
        } else if !self.unsent.is_empty() {
            // Only this client's own items since the last send: everything else it holds came
            // from the server.
            let mut since = StateVector::default();
            for (client, clock) in d.transact().state_vector().iter() {
                since.set_max(
                    *client,
                    if *client == me {
                        self.sent_clock
                    } else {
                        *clock
                    },
                );
            }
            let update = d.transact().encode_state_as_update_v1(&since);
            (update, std::mem::take(&mut self.unsent))
        } else {
            return;
        };
        self.sent_clock = d.transact().state_vector().get(&me);
        self.unsent.clear();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.insert(seq, covers);
        let frame = ClientFrame::Update {
            doc: DOC.to_string(),
            update,
            seq: Some(seq),
        };
        if !c.try_send(&frame).await {
            self.disconnect();
        }
    }

    async fn read_for(&mut self, pace: Duration) {
        let until = Instant::now() + pace;
        while let Some(c) = self.client.as_mut() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match c.next_event(left).await {
                None => break,
                Some(Event::Frame(f)) => {
                    let what = frame_kind(&f);
                    self.answer(f);
                    self.check_integrated(what);
                }
                Some(Event::Closed(code)) => {
                    *self.closes.entry(format!("{code:?}")).or_default() += 1;
                    self.disconnect();
                }
            }
        }
    }

    /// Records the moment the local document starts holding an update it cannot integrate
    /// (yrs keeps it pending). Nodes send a client only log entries, in log order, and every
    /// entry builds on earlier ones; a pending update means the log holds an entry whose
    /// dependencies it lacks. Such a client's whole state then carries a gap, which nodes
    /// refuse (`bad_update`), so it could never resend what it has.
    fn check_integrated(&mut self, what: &'static str) {
        if let Some(mut c) = self.client.take() {
            self.note_pending(&mut c, what);
            self.client = Some(c);
        }
    }

    fn note_pending(&mut self, c: &mut NativeClient, what: &'static str) {
        let missing = missing_dependencies(c.doc(DOC));
        if let Some(missing) = &missing
            && !self.holding_pending
        {
            let position = c.positions.get(DOC).map(|p| p.to_string());
            self.pending.push(format!(
                "{} at {:.2}s on {} after {what} (position {}): {missing}",
                self.name,
                self.start.elapsed().as_secs_f64(),
                self.node.map_or("?".into(), |a| a.to_string()),
                position.unwrap_or_default()
            ));
        }
        self.holding_pending = missing.is_some();
    }

    fn answer(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Ack {
                seq: Some(seq),
                position,
                ..
            } => {
                let record = AckRecord {
                    at: self.start.elapsed(),
                    node: self.node.expect("connected"),
                    position,
                    seq,
                    whole_state: self.resend_seq == Some(seq),
                };
                for i in self.inflight.remove(&seq).unwrap_or_default() {
                    self.acks[i].get_or_insert(record);
                }
                if self.resend_seq == Some(seq) {
                    self.resend_seq = None;
                    self.resend_at = None;
                }
            }
            ServerFrame::Error {
                code, seq, message, ..
            } => {
                *self.errors.entry(code.as_str()).or_default() += 1;
                // Faults explain these: Redis away (append_failed), a document that could not
                // load (unavailable), an update built on one that failed (missing_dependencies).
                if !code.retryable() && code != ErrorCode::MissingDependencies {
                    self.unexpected
                        .push(format!("{}: {code:?} {message}", self.name));
                }
                let was_resend = seq.is_some() && seq == self.resend_seq;
                if let Some(s) = seq {
                    self.inflight.remove(&s);
                }
                if was_resend || self.resend_at.is_none() {
                    self.resend_seq = None;
                    self.resend_at = Some(Instant::now() + RETRY);
                }
            }
            _ => {}
        }
    }

    /// Drops the socket without a close frame, keeping the document and position.
    fn disconnect(&mut self) {
        if let Some(mut c) = self.client.take() {
            self.docs = std::mem::take(&mut c.docs);
            self.positions = std::mem::take(&mut c.positions);
        }
        self.inflight.clear();
        self.resend_seq = None;
    }

    /// Connects to a random node that is up, resumes from the last position and waits for
    /// `synced`; then the whole state goes out again.
    async fn reconnect(&mut self) {
        let until = Instant::now() + FINISH;
        loop {
            assert!(
                Instant::now() < until,
                "{}: no node took a subscription for {FINISH:?}",
                self.name
            );
            let addr = pick(&mut self.rng, &self.addrs);
            let Some(mut c) = NativeClient::try_connect(&format!("ws://{addr}/v1/ws")).await else {
                tokio::time::sleep(RETRY).await;
                continue;
            };
            c.docs = std::mem::take(&mut self.docs);
            c.positions = std::mem::take(&mut self.positions);
            c.doc(DOC);
            let subscribe = ClientFrame::Subscribe {
                doc: DOC.to_string(),
                position: c.positions.get(DOC).copied(),
                state_vector: None,
            };
            if c.try_send(&subscribe).await && self.wait_synced(&mut c).await {
                self.connects += 1;
                self.node = Some(addr);
                self.client = Some(c);
                self.resend_at = Some(Instant::now());
                self.resend_seq = None;
                return;
            }
            self.docs = std::mem::take(&mut c.docs);
            self.positions = std::mem::take(&mut c.positions);
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn wait_synced(&mut self, c: &mut NativeClient) -> bool {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match c.next_event(left).await {
                Some(Event::Frame(ServerFrame::Synced { .. })) => {
                    self.note_pending(c, "synced");
                    return true;
                }
                Some(Event::Frame(ServerFrame::Error { code, .. })) => {
                    // The document could not load (Redis away): try again.
                    *self.errors.entry(code.as_str()).or_default() += 1;
                    return false;
                }
                Some(Event::Frame(_)) => {}
                Some(Event::Closed(_)) | None => return false,
            }
        }
    }

    fn text(&mut self) -> String {
        self.client.as_mut().expect("connected").text(DOC)
    }

    fn yrs_client(&mut self) -> u64 {
        let doc = match self.client.as_mut() {
            Some(c) => c.doc(DOC),
            None => self.docs.entry(DOC.to_string()).or_default(),
        };
        doc.client_id().get()
    }

    fn acked_tokens(&self) -> impl Iterator<Item = String> + '_ {
        self.acked_tokens_by(Duration::MAX)
    }

    /// Tokens acknowledged within `by` of the start.
    fn acked_tokens_by(&self, by: Duration) -> impl Iterator<Item = String> + '_ {
        self.tokens
            .iter()
            .zip(&self.acks)
            .filter(move |(_, a)| a.as_ref().is_some_and(|a| a.at <= by))
            .map(|(t, _)| t.clone())
    }

    fn summary(&self) -> String {
        format!(
            "{}: {} tokens, {} connects, {} drops, closes {:?}, errors {:?}, held unintegrable updates {} times{}",
            self.name,
            self.tokens.len(),
            self.connects,
            self.drops,
            self.closes,
            self.errors,
            self.pending.len(),
            match self.unexpected.first() {
                Some(first) => format!(", first unexpected error: {first}"),
                None => String::new(),
            }
        )
    }
}

/// What a document waits for, if it holds updates it could not integrate: per yrs client
/// (writers' ids are listed at the end of a run), the clock it needs and the clock it has.
fn missing_dependencies(doc: &yrs::Doc) -> Option<String> {
    let txn = doc.transact();
    if !txn.has_missing_updates() {
        return None;
    }
    let have = txn.state_vector();
    let needs: Vec<String> = txn
        .store()
        .pending_update()
        .map(|p| {
            p.missing
                .iter()
                .map(|(client, clock)| {
                    format!("client {client} clock {clock} (has {})", have.get(client))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(format!("needs {}", needs.join(", ")))
}

fn frame_kind(f: &ServerFrame) -> &'static str {
    match f {
        ServerFrame::Synced { .. } => "synced",
        ServerFrame::Update { .. } => "update",
        ServerFrame::Ack { .. } => "ack",
        ServerFrame::Error { .. } => "error",
        _ => "another frame",
    }
}

/// Which acknowledgement first covered a native client's token.
#[derive(Debug, Clone, Copy)]
struct AckRecord {
    /// Since the test started.
    at: Duration,
    node: SocketAddr,
    position: Position,
    seq: u64,
    /// The update was the client's whole state (sent after a reconnect or a failure).
    whole_state: bool,
}

/// Prints what is known about lost tokens: who acknowledged each, when and at which
/// position, and whether its bytes are still in the Redis log or in a snapshot file.
async fn explain_loss(cluster: &Cluster, natives: &[Native], lost: &BTreeSet<String>) {
    let key = format!("chorus:{{{DOC}}}:log");
    let log = cluster
        .redis
        .cli(&["--raw", "XRANGE", &key, "-", "+"])
        .await;
    let meta = cluster
        .redis
        .cli(&["HGETALL", &format!("chorus:{{{DOC}}}:meta")])
        .await;
    let first = cluster
        .redis
        .cli(&["XRANGE", &key, "-", "+", "COUNT", "1"])
        .await;
    eprintln!(
        "chaos: redis log: {} entries, meta {:?}, first entry id {:?}",
        cluster.redis.cli(&["XLEN", &key]).await.trim(),
        meta.split_whitespace().collect::<Vec<_>>(),
        first.lines().next().unwrap_or_default()
    );
    let mut snapshots = Vec::new();
    for entry in std::fs::read_dir(cluster.snapshots.path())
        .expect("snapshot dir")
        .flatten()
    {
        let path = entry.path();
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            std::fs::read_dir(&path)
                .expect("dir")
                .flatten()
                .map(|e| e.path())
                .collect()
        } else {
            vec![path]
        };
        for f in files {
            let bytes = std::fs::read(&f).unwrap_or_default();
            snapshots.push((f, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    for (f, _) in &snapshots {
        eprintln!("chaos: snapshot file {}", f.display());
    }
    for t in lost {
        let ack = natives
            .iter()
            .find_map(|n| n.tokens.iter().position(|x| x == t).map(|i| n.acks[i]))
            .flatten()
            .map_or("none (a token a node once served)".to_string(), |a| {
                format!(
                    "at {:.2}s by {} at {} (seq {}{})",
                    a.at.as_secs_f64(),
                    a.node,
                    a.position,
                    a.seq,
                    if a.whole_state { ", whole state" } else { "" }
                )
            });
        let in_snapshot: Vec<String> = snapshots
            .iter()
            .filter(|(_, body)| body.contains(t.as_str()))
            .map(|(f, _)| f.display().to_string())
            .collect();
        eprintln!(
            "chaos: lost {t}: ack {ack}; in the redis log: {}; in snapshots: {in_snapshot:?}",
            log.contains(t.as_str())
        );
    }
}

/// A stock Yjs client (y-websocket reconnects by itself, to the same node). A socket drop
/// kills the process and starts a new client on a random node: what the dead one had not
/// sent yet is gone with it, which is why its tokens count only once a node served them.
struct Stock {
    name: String,
    index: usize,
    addrs: Vec<SocketAddr>,
    rng: StdRng,
    client: Option<StockClient>,
    tokens: Vec<String>,
    respawns: usize,
    /// The yrs client id of each process this client ran as.
    yrs_clients: Vec<u64>,
}

impl Stock {
    fn new(i: usize, index: usize, addrs: &[SocketAddr], rng: StdRng) -> Self {
        Stock {
            name: format!("s{i}"),
            index,
            addrs: addrs.to_vec(),
            rng,
            client: None,
            tokens: Vec::new(),
            respawns: 0,
            yrs_clients: Vec::new(),
        }
    }

    async fn spawn(&mut self) -> StockClient {
        let addr = pick(&mut self.rng, &self.addrs);
        let mut c = StockClient::spawn(&format!("ws://{addr}/y"), DOC).await;
        self.yrs_clients.push(c.client_id().await);
        c
    }

    async fn run(mut self, writing: CancellationToken, drops: Arc<Vec<AtomicBool>>) -> Self {
        self.client = Some(self.spawn().await);
        while !writing.is_cancelled() {
            if drops[self.index].swap(false, Ordering::Relaxed) {
                self.client.take().expect("client").kill().await;
                self.client = Some(self.spawn().await);
                self.respawns += 1;
            }
            let token = format!("[{}-{}]", self.name, self.tokens.len());
            self.client.as_mut().expect("client").append(&token).await;
            self.tokens.push(token);
            let pace = Duration::from_millis(self.rng.random_range(200..500));
            tokio::time::sleep(pace).await;
        }
        self
    }

    fn summary(&self) -> String {
        format!(
            "{}: {} tokens, {} respawns",
            self.name,
            self.tokens.len(),
            self.respawns
        )
    }
}

/// Posts its own edits to `POST /v1/docs/{doc}/updates` on a random node: each post carries
/// everything since the last 200, so a failed or unanswered post is simply covered by the next.
struct HttpWriter {
    addrs: Vec<SocketAddr>,
    rng: StdRng,
    doc: yrs::Doc,
    tokens: Vec<String>,
    acked: usize,
    acked_during_faults: usize,
    acked_sv: StateVector,
    answers: BTreeMap<String, usize>,
}

impl HttpWriter {
    fn new(addrs: &[SocketAddr], rng: StdRng) -> Self {
        HttpWriter {
            addrs: addrs.to_vec(),
            rng,
            doc: yrs::Doc::new(),
            tokens: Vec::new(),
            acked: 0,
            acked_during_faults: 0,
            acked_sv: StateVector::default(),
            answers: BTreeMap::new(),
        }
    }

    async fn run(mut self, writing: CancellationToken) -> Self {
        while !writing.is_cancelled() {
            let token = format!("[h-{}]", self.tokens.len());
            let t = self.doc.get_or_insert_text("t");
            {
                let mut txn = self.doc.transact_mut();
                let end = t.len(&txn);
                t.insert(&mut txn, end, &token);
            }
            self.tokens.push(token);
            self.post().await;
            let pace = Duration::from_millis(self.rng.random_range(150..300));
            tokio::time::sleep(pace).await;
        }
        self.acked_during_faults = self.acked;
        let until = Instant::now() + FINISH;
        while self.acked < self.tokens.len() {
            assert!(
                Instant::now() < until,
                "HTTP writer: no 200 for {FINISH:?} after the faults stopped: {}",
                self.summary()
            );
            self.post().await;
            tokio::time::sleep(RETRY).await;
        }
        self
    }

    async fn post(&mut self) {
        let (update, sv) = {
            let txn = self.doc.transact();
            (
                txn.encode_state_as_update_v1(&self.acked_sv),
                txn.state_vector(),
            )
        };
        let covers = self.tokens.len();
        let addr = pick(&mut self.rng, &self.addrs);
        let path = format!("/v1/docs/{DOC}/updates");
        let answer = tokio::time::timeout(DEADLINE, http::post(addr, &path, &update)).await;
        let key = match answer {
            Ok(Ok(r)) => {
                if r.status == 200 {
                    self.acked = covers;
                    self.acked_sv = sv;
                }
                r.status.to_string()
            }
            Ok(Err(_)) => "io error".to_string(),
            Err(_) => "timeout".to_string(),
        };
        *self.answers.entry(key).or_default() += 1;
    }

    fn acked_tokens(&self) -> impl Iterator<Item = String> + '_ {
        self.tokens[..self.acked].iter().cloned()
    }

    fn summary(&self) -> String {
        format!(
            "http writer: {} tokens, {} acked during faults, answers {:?}",
            self.tokens.len(),
            self.acked_during_faults,
            self.answers
        )
    }
}

/// Reads the document from a random node now and then and records every token it serves:
/// a node serves only what it read back from the log, so each of them must survive.
async fn observe(
    addrs: Vec<SocketAddr>,
    mut rng: StdRng,
    writing: CancellationToken,
    seen: Arc<Mutex<BTreeSet<String>>>,
) -> usize {
    let mut reads = 0;
    while !writing.is_cancelled() {
        let addr = pick(&mut rng, &addrs);
        if let Ok(Some(text)) = tokio::time::timeout(DEADLINE, node_text(addr, DOC)).await {
            seen.lock().expect("seen").extend(tokens_in(&text));
            reads += 1;
        }
        let pace = Duration::from_millis(rng.random_range(300..800));
        tokio::time::sleep(pace).await;
    }
    reads
}

/// Waits until every native client, every stock client and every node (a fresh HTTP read)
/// holds the same text, containing every token in `acked`. Err says what differed at the end.
async fn converge(
    natives: &mut [Native],
    stocks: &mut [Stock],
    addrs: &[SocketAddr],
    acked: &BTreeSet<String>,
) -> Result<(), String> {
    let until = Instant::now() + FINISH;
    loop {
        let mut views: Vec<(String, String)> = Vec::new();
        for n in natives.iter_mut() {
            if n.client.is_none() {
                n.reconnect().await;
            }
            n.read_for(Duration::from_millis(5)).await;
            if n.client.is_some() {
                views.push((n.name.clone(), n.text()));
            }
        }
        for s in stocks.iter_mut() {
            let text = s.client.as_mut().expect("client").text().await;
            views.push((s.name.clone(), text));
        }
        for addr in addrs {
            let text = node_text(*addr, DOC).await.unwrap_or_default();
            views.push((format!("node {addr}"), text));
        }
        let same = views.windows(2).all(|w| w[0].1 == w[1].1);
        let complete = acked.iter().all(|t| views[0].1.contains(t.as_str()));
        if same && complete && views.len() == natives.len() + stocks.len() + addrs.len() {
            return Ok(());
        }
        if Instant::now() >= until {
            let reference: BTreeSet<String> =
                views.iter().flat_map(|(_, t)| tokens_in(t)).collect();
            let mut report = format!(
                "{} tokens in the union of all views, {} acked",
                reference.len(),
                acked.len()
            );
            for (who, text) in &views {
                let has: BTreeSet<String> = tokens_in(text).collect();
                let missing: Vec<&String> = reference.difference(&has).collect();
                let missing_acked = acked.iter().filter(|t| !has.contains(*t)).count();
                report.push_str(&format!(
                    "\n  {who}: {} tokens, missing {} ({} acked): {:?}",
                    has.len(),
                    missing.len(),
                    missing_acked,
                    missing.iter().take(10).collect::<Vec<_>>()
                ));
            }
            return Err(report);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
