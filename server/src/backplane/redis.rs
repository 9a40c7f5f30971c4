//! The Redis backplane (data-flow steps 4–5 across nodes): XADD batches in, XREAD readers out.
//!
//! Key layout, all keys of a document in one hash slot (the document id is the hash tag; the
//! `DocId` alphabet has no braces):
//!
//! - `chorus:{DOC}:log`  — the stream; fields `e` (epoch), `u` (yrs v1 update), `o` (origin)
//! - `chorus:{DOC}:meta` — hash: `epoch`, `floor` (id of the newest trimmed entry)
//! - `chorus:{DOC}:aw`   — short-lived awareness stream; fields `n` (node), `u` (update)
//! - `chorus:{DOC}:lock` — compaction lock (`SET NX PX`), value = node id
//! - `chorus:node:NODE`  — node heartbeat, expires after `presence_ttl`
//! - `chorus:revocations` — stream of revoked subjects / token ids (fields `s`, `j`, `x`, `t`),
//!   read by every node from the start, so nodes that start later learn them too
//! - `chorus:ctl:NODE`   — per-node control stream that wakes its blocking XREAD (standalone)
//! - `chorus:{TAG}:wake` — per-shard wake stream (cluster), TAG hashes into that shard
//!
//! Meta and stream are created together by a document's first append (reads never create
//! keys: a reader of a document nobody wrote costs Redis nothing), and every script that
//! writes checks both exist: if either vanished (FLUSHALL, eviction, a deleted key) the log
//! starts a new epoch, so clients holding positions of the old one resync instead of
//! replaying across a gap. Every entry carries its epoch, so readers deliver it without
//! another round trip.
//!
//! Writes: `append` admits into a bounded queue in call order; one writer task takes whatever
//! is waiting, sends one `EVAL` per document (all that document's updates in one call), all
//! documents concurrently on a multiplexed connection (one round trip per group), and answers
//! the appenders only once Redis answered. Reads: see [`Reader`].

use super::{
    Backplane, BackplaneError, BackplaneResult, Entry, EntrySink, LogHead, Origin, Revocation,
    RevocationSink, answer, new_epoch,
};
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Appends admitted but not yet sent. Past this, `append` answers `Overloaded` at once.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Most operations the writer takes in one group.
const MAX_GROUP: usize = 4096;
/// Most updates in one `EVAL` (keeps one script call short; Redis is single-threaded).
const MAX_PER_EVAL: usize = 512;
/// Most entries one XREAD returns per stream; the reader comes back for the rest at once.
const READ_COUNT: usize = 1024;
/// How long a blocking XREAD waits before it re-checks; in cluster mode also the longest a
/// shard reader goes without reading all its documents, wake-ups or not.
const BLOCK: Duration = Duration::from_millis(1000);
/// Shortest blocking XREAD a cluster reader issues when its next full read is nearly due
/// (`BLOCK 0` would mean "forever").
const MIN_BLOCK: Duration = Duration::from_millis(10);
/// How often every node re-reads the cluster's slot map (a reshard, a failover, a new master).
/// A reader whose query fails asks for a refresh at once, at most one per [`TOPOLOGY_GAP`].
const TOPOLOGY_REFRESH: Duration = Duration::from_secs(30);
const TOPOLOGY_GAP: Duration = Duration::from_secs(1);
const HASH_SLOTS: u16 = 16384;

/// How to reach Redis and the timing knobs of the Redis backplane.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port` URLs; several (or a `redis+cluster://` scheme) mean Redis Cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Bound on one round trip: an append with Redis unreachable fails within about this long.
    pub timeout: Duration,
    /// A node whose heartbeat is older than this is dead; its clients' presence is removed.
    pub presence_ttl: Duration,
}

impl RedisSettings {
    /// Reads the `--redis-url` values: one `redis://` URL is a standalone server; several, or
    /// `redis+cluster://h1:p1,h2:p2`, are the seeds of a cluster.
    pub fn from_urls(urls: &[String], timeout: Duration, presence_ttl: Duration) -> Self {
        let mut out = Vec::new();
        let mut cluster = urls.len() > 1;
        for u in urls {
            if let Some(rest) = u.strip_prefix("redis+cluster://") {
                cluster = true;
                out.extend(rest.split(',').map(|h| format!("redis://{h}")));
            } else {
                out.push(u.clone());
            }
        }
        RedisSettings {
            urls: out,
            cluster,
            timeout,
            presence_ttl,
        }
    }
}

fn log_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:log")
}
fn meta_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:meta")
}
fn aw_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:aw")
}
fn lock_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:lock")
}
fn node_key(node: u64) -> String {
    format!("chorus:node:{node:016x}")
}

/// The Redis Cluster hash slot of a hash tag.
fn slot_of(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % HASH_SLOTS
}

/// Shared by every script that writes: the epoch of a log whose meta and stream both exist,
/// or a new epoch (ARGV[1]) with a fresh, empty stream if either is missing.
const ENSURE_LUA: &str = r#"
local function ensure()
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if epoch and redis.call('EXISTS', KEYS[2]) == 1 then return epoch end
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'floor', '0-0')
  redis.call('XGROUP', 'CREATE', KEYS[2], 'chorus', '$', 'MKSTREAM')
  redis.call('XGROUP', 'DESTROY', KEYS[2], 'chorus')
  return ARGV[1]
end
local function last_id()
  if redis.call('EXISTS', KEYS[2]) == 0 then return '0-0' end
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return '0-0'
end
"#;

/// KEYS: meta, log. ARGV: new epoch, then (update, origin) pairs. Returns {epoch, id...}.
const APPEND_LUA: &str = r#"
local epoch = ensure()
local out = {epoch}
for i = 2, #ARGV, 2 do
  out[#out + 1] = redis.call('XADD', KEYS[2], '*', 'e', epoch, 'u', ARGV[i], 'o', ARGV[i + 1])
end
return out
"#;

/// KEYS: meta, log. ARGV: after. Returns {epoch or '0', floor, last, entries}. Read-only: a
/// missing log reads as epoch 0 (no log yet); the next write creates one.
const READ_LUA: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then return {'0', '0-0', '0-0', {}} end
local floor = redis.call('HGET', KEYS[1], 'floor') or '0-0'
return {epoch, floor, last_id(), redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+')}
"#;

/// KEYS: meta, log. ARGV: before. Removes entries below `before`; the newest removed id
/// becomes the floor (which only moves forward).
const TRIM_LUA: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 or ARGV[1] == '0-0' then return 0 end
local newest = redis.call('XREVRANGE', KEYS[2], '(' .. ARGV[1], '-', 'COUNT', 1)
if #newest == 0 then return 0 end
local removed = redis.call('XTRIM', KEYS[2], 'MINID', ARGV[1])
local id = newest[1][1]
local floor = redis.call('HGET', KEYS[1], 'floor') or '0-0'
local fm, fs = string.match(floor, '(%d+)-(%d+)')
local im, is = string.match(id, '(%d+)-(%d+)')
if tonumber(im) > tonumber(fm) or (tonumber(im) == tonumber(fm) and tonumber(is) > tonumber(fs)) then
  redis.call('HSET', KEYS[1], 'floor', id)
end
return removed
"#;

/// KEYS: lock. ARGV: node. Deletes the lock only if this node holds it.
const UNLOCK_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

fn script(body: &str) -> String {
    format!("{ENSURE_LUA}\n{body}")
}

/// One handle over a standalone or cluster connection; both multiplex and pipeline
/// concurrent requests, and reconnect on their own.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// A reader's own connection (no reconnect logic: the reader reconnects itself).
    Plain(redis::aio::MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
        }
    }
}

fn storage<E: std::fmt::Display>(e: E) -> BackplaneError {
    BackplaneError::Storage(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commands this process sent to Redis (an EVAL counts once, whatever the script does
/// inside), for the benchmark's "commands per update".
static COMMANDS_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn commands_sent() -> u64 {
    COMMANDS_SENT.load(std::sync::atomic::Ordering::Relaxed)
}

fn count(n: u64) {
    COMMANDS_SENT.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Runs one command with the backplane's bound on a round trip.
async fn query(conn: &mut Conn, cmd: &Cmd, timeout: Duration) -> BackplaneResult<Value> {
    query_op(conn, cmd, timeout, "command").await
}

/// [`query`], counting a failure under `op` in [`crate::metrics::names::REDIS_ERRORS`].
async fn query_op(
    conn: &mut Conn,
    cmd: &Cmd,
    timeout: Duration,
    op: &'static str,
) -> BackplaneResult<Value> {
    count(1);
    let result = match tokio::time::timeout(timeout, cmd.query_async::<Value>(conn)).await {
        Err(_) => Err(BackplaneError::Storage(format!(
            "redis did not answer within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(storage(e)),
        Ok(Ok(Value::ServerError(e))) => Err(storage(format!("{e:?}"))),
        Ok(Ok(v)) => Ok(v),
    };
    if result.is_err() {
        metrics::counter!(crate::metrics::names::REDIS_ERRORS, "op" => op).increment(1);
    }
    result
}

fn eval(body: &str, doc: &DocId) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(body).arg(2).arg(meta_key(doc)).arg(log_key(doc));
    cmd
}

enum WriteOp {
    Append {
        doc: DocId,
        update: Bytes,
        origin: Option<Origin>,
        reply: oneshot::Sender<BackplaneResult<Position>>,
    },
    Awareness {
        doc: DocId,
        update: Bytes,
    },
}

/// What the reader tasks read: every watched document and where its reader stands.
#[derive(Default)]
struct Watched {
    docs: HashMap<DocId, Cursor>,
    next_gen: u64,
    /// Documents watched since a reader last looked (so it reads them at once).
    fresh: HashSet<DocId>,
}

#[derive(Clone, Copy)]
struct Cursor {
    log: StreamId,
    aw: StreamId,
    /// Bumped on every `watch`, so a read started before a re-watch cannot move the cursor.
    generation: u64,
}

/// Which documents each cluster shard reader owns and where to wake it. Two nodes that read
/// the same slot map pick the same wake key for each master (the first `w{i}` tag in its
/// slots), whatever order CLUSTER SLOTS lists the masters in.
#[derive(Debug, PartialEq, Eq)]
struct Topology {
    /// slot → shard index.
    shard_of_slot: Vec<u16>,
    /// Per shard: the wake stream key (a hash tag inside that shard).
    wake_keys: Vec<String>,
}

impl Topology {
    fn single() -> Self {
        Topology {
            shard_of_slot: vec![0; HASH_SLOTS as usize],
            wake_keys: vec![String::new()],
        }
    }

    fn shard(&self, doc: &DocId) -> usize {
        usize::from(self.shard_of_slot[usize::from(slot_of(doc.as_str()))])
    }
}

/// The current slot map and which shard readers run, under one lock so that a reader leaving
/// (its shard is gone) and a refresh adding that shard back cannot miss each other.
///
/// While a new map spreads (every node refreshes on its own), a document may briefly be read
/// by two readers of this node (harmless: each delivery moves the per-document cursor in
/// [`Watched`] only forward, and the document ignores entries it applied) or by none, or be
/// woken on a key nobody here blocks on: the timed full read (at least every [`BLOCK`]) of
/// every shard reader picks it up within about a second.
struct Shards {
    topology: Arc<Topology>,
    readers: HashSet<usize>,
}

impl Shards {
    fn new(topology: Topology) -> Self {
        Shards {
            topology: Arc::new(topology),
            readers: HashSet::new(),
        }
    }

    /// Installs a freshly read map; returns the shards that need a reader started (all of
    /// them the first time, then those a grown cluster added or whose reader left).
    fn install(&mut self, topology: Topology) -> Vec<usize> {
        if *self.topology != topology {
            self.topology = Arc::new(topology);
        }
        let mut start: Vec<usize> = (0..self.topology.wake_keys.len())
            .filter(|s| !self.readers.contains(s))
            .collect();
        start.sort_unstable();
        self.readers.extend(start.iter().copied());
        start
    }

    /// The map for shard `shard`'s reader, or `None` (and the reader is forgotten) if the
    /// cluster has fewer masters now: that reader stops.
    fn keep_reader(&mut self, shard: usize) -> Option<Arc<Topology>> {
        if shard < self.topology.wake_keys.len() {
            Some(self.topology.clone())
        } else {
            self.readers.remove(&shard);
            None
        }
    }
}

struct Inner {
    conn: Conn,
    node: u64,
    settings: RedisSettings,
    sink: OnceLock<Weak<dyn EntrySink>>,
    watched: Mutex<Watched>,
    /// Signalled when the watched set grows; the waker task turns it into a wake-up XADD.
    watch_changed: Notify,
    /// Remote nodes seen in awareness entries; checked against their heartbeat keys.
    remote_nodes: Mutex<HashSet<u64>>,
    /// Never held across an `.await`: callers clone the `Arc<Topology>` out.
    shards: Mutex<Shards>,
    /// A cluster reader's query failed (maybe MOVED/ASK/CLUSTERDOWN after a reshard or a
    /// failover): re-read the slot map now rather than at the next periodic refresh.
    topology_stale: Notify,
    /// To open reader connections, also for readers of shards a refresh adds.
    client: Client,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Inner {
    fn topology(&self) -> Arc<Topology> {
        lock(&self.shards).topology.clone()
    }
}

pub struct RedisBackplane {
    inner: Arc<Inner>,
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    tracker: TaskTracker,
}

#[derive(Clone)]
enum Client {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl RedisBackplane {
    /// Connects (failing fast if Redis is unreachable at start) and starts the writer, the
    /// readers, the waker and the heartbeat on `tracker`.
    pub async fn connect(
        settings: RedisSettings,
        node: u64,
        tracker: &TaskTracker,
    ) -> BackplaneResult<Self> {
        let (client, conn, topology) = if settings.cluster {
            let client = redis::cluster::ClusterClient::builder(settings.urls.clone())
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                .build()
                .map_err(storage)?;
            let mut conn = Conn::Cluster(client.get_async_connection().await.map_err(storage)?);
            let topology = cluster_topology(&mut conn, settings.timeout).await?;
            (Client::Cluster(Box::new(client)), conn, topology)
        } else {
            let url = settings
                .urls
                .first()
                .ok_or_else(|| BackplaneError::Storage("no redis url".into()))?;
            let client = redis::Client::open(url.as_str()).map_err(storage)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1);
            let conn = Conn::Single(
                client
                    .get_connection_manager_with_config(config)
                    .await
                    .map_err(storage)?,
            );
            (Client::Single(client), conn, Topology::single())
        };
        let inner = Arc::new(Inner {
            conn,
            node,
            settings,
            sink: OnceLock::new(),
            watched: Mutex::new(Watched::default()),
            watch_changed: Notify::new(),
            remote_nodes: Mutex::new(HashSet::new()),
            shards: Mutex::new(Shards::new(Topology::single())),
            topology_stale: Notify::new(),
            client,
            tracker: tracker.clone(),
            cancel: CancellationToken::new(),
        });
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let (done_tx, done_rx) = oneshot::channel();
        let writer = inner.clone();
        tracker.spawn(async move {
            run_writer(writer, rx).await;
            let _ = done_tx.send(());
        });
        tracker.spawn(run_waker(inner.clone()));
        tracker.spawn(run_heartbeat(inner.clone()));
        let start = lock(&inner.shards).install(topology);
        for shard in start {
            spawn_reader(&inner, shard);
        }
        if inner.settings.cluster {
            tracker.spawn(run_topology(inner.clone()));
        }
        Ok(RedisBackplane {
            inner,
            tx: Mutex::new(Some(tx)),
            writer_done: Mutex::new(Some(done_rx)),
            tracker: tracker.clone(),
        })
    }

    fn submit(&self, op: WriteOp) -> BackplaneResult<()> {
        let guard = lock(&self.tx);
        let tx = guard.as_ref().ok_or(BackplaneError::Closed)?;
        tx.try_send(op).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BackplaneError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => BackplaneError::Closed,
        })
    }

    /// Number of shard readers (1 for a standalone server).
    pub fn shards(&self) -> usize {
        self.inner.topology().wake_keys.len()
    }
}

fn spawn_reader(inner: &Arc<Inner>, shard: usize) {
    let reader = Reader {
        inner: inner.clone(),
        shard,
    };
    inner.tracker.spawn(reader.run());
}

/// Cluster mode: re-reads the slot map every [`TOPOLOGY_REFRESH`], and soon after a reader
/// reports a failed query, so that a reshard or a new master changes which reader reads which
/// document and which wake key writers use (see [`Shards`] for the transition).
async fn run_topology(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(TOPOLOGY_REFRESH) => {}
            _ = inner.topology_stale.notified() => {}
        }
        let mut conn = inner.conn.clone();
        match cluster_topology(&mut conn, inner.settings.timeout).await {
            Ok(topology) => {
                let before = inner.topology();
                let start = lock(&inner.shards).install(topology);
                let after = inner.topology();
                if !Arc::ptr_eq(&before, &after) {
                    tracing::info!(
                        masters = after.wake_keys.len(),
                        "redis cluster slot map changed; readers follow it"
                    );
                }
                for shard in start {
                    spawn_reader(&inner, shard);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot re-read the redis cluster slot map"),
        }
        // However many readers fail at once, one refresh per gap.
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(TOPOLOGY_GAP) => {}
        }
    }
}

/// Reads the cluster's slot map and picks, per master, a hash tag that lands in it.
async fn cluster_topology(conn: &mut Conn, timeout: Duration) -> BackplaneResult<Topology> {
    parse_cluster_slots(query(conn, redis::cmd("CLUSTER").arg("SLOTS"), timeout).await?)
}

/// A CLUSTER SLOTS reply → the topology.
fn parse_cluster_slots(slots: Value) -> BackplaneResult<Topology> {
    let Value::Array(ranges) = slots else {
        return Err(storage("unexpected CLUSTER SLOTS reply"));
    };
    let mut masters: Vec<String> = Vec::new();
    let mut shard_of_slot = vec![0u16; HASH_SLOTS as usize];
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(Value::Array(master))) =
            (as_u64(parts.first()), as_u64(parts.get(1)), parts.get(2))
        else {
            continue;
        };
        let addr = format!(
            "{}:{}",
            as_string(master.first()).unwrap_or_default(),
            as_u64(master.get(1)).unwrap_or(0)
        );
        let shard = match masters.iter().position(|m| *m == addr) {
            Some(i) => i,
            None => {
                masters.push(addr);
                masters.len() - 1
            }
        };
        for s in start..=end.min(u64::from(HASH_SLOTS) - 1) {
            shard_of_slot[s as usize] = shard as u16;
        }
    }
    if masters.is_empty() {
        return Err(storage("the cluster has no slots assigned"));
    }
    let mut wake_keys = vec![String::new(); masters.len()];
    let mut missing = masters.len();
    let mut i = 0u64;
    while missing > 0 && i < 1_000_000 {
        let tag = format!("w{i}");
        let shard = usize::from(shard_of_slot[usize::from(slot_of(&tag))]);
        if wake_keys[shard].is_empty() {
            wake_keys[shard] = format!("chorus:{{{tag}}}:wake");
            missing -= 1;
        }
        i += 1;
    }
    Ok(Topology {
        shard_of_slot,
        wake_keys,
    })
}

impl Backplane for RedisBackplane {
    fn name(&self) -> &'static str {
        match self.inner.client {
            Client::Single(_) => "redis",
            Client::Cluster(_) => "redis-cluster",
        }
    }

    fn append(
        &self,
        doc: &DocId,
        update: Bytes,
        origin: Option<Origin>,
    ) -> BoxFuture<'static, BackplaneResult<Position>> {
        let (reply, rx) = oneshot::channel();
        answer(
            self.submit(WriteOp::Append {
                doc: doc.clone(),
                update,
                origin,
                reply,
            }),
            rx,
        )
    }

    fn read_after(
        &self,
        doc: &DocId,
        after: StreamId,
    ) -> BoxFuture<'static, BackplaneResult<(LogHead, Vec<Entry>)>> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        let mut cmd = eval(&script(READ_LUA), doc);
        cmd.arg(after.to_string());
        async move {
            let v = query(&mut conn, &cmd, timeout).await?;
            let mut parts = as_array(v)?.into_iter();
            let head = LogHead {
                epoch: parse_u64(parts.next().as_ref())?,
                floor: parse_id(parts.next().as_ref())?,
                last: parse_id(parts.next().as_ref())?,
            };
            let entries = match parts.next() {
                Some(v) => parse_entries(v)?
                    .into_iter()
                    .map(|(_, e)| e)
                    .collect::<Vec<_>>(),
                None => Vec::new(),
            };
            Ok((head, entries))
        }
        .boxed()
    }

    fn trim(&self, doc: &DocId, before: StreamId) -> BoxFuture<'static, BackplaneResult<()>> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        let mut cmd = eval(&script(TRIM_LUA), doc);
        cmd.arg(before.to_string());
        async move { query(&mut conn, &cmd, timeout).await.map(|_| ()) }.boxed()
    }

    fn attach(&self, sink: Weak<dyn EntrySink>) {
        let _ = self.inner.sink.set(sink);
    }

    fn watch(&self, doc: &DocId, after: StreamId) {
        {
            let mut w = lock(&self.inner.watched);
            w.next_gen += 1;
            let generation = w.next_gen;
            // Presence from before the watch still matters if it is younger than the TTL: a
            // node that loads a document late learns who is already there.
            let aw = StreamId::new(
                super::now_ms().saturating_sub(self.inner.settings.presence_ttl.as_millis() as u64),
                0,
            );
            w.docs.insert(
                doc.clone(),
                Cursor {
                    log: after,
                    aw,
                    generation,
                },
            );
            w.fresh.insert(doc.clone());
        }
        self.inner.watch_changed.notify_one();
    }

    fn unwatch(&self, doc: &DocId) {
        // No wake-up needed: a reader delivering one more batch for an unwatched document is
        // harmless (the registry drops entries of documents that are not hot).
        let mut w = lock(&self.inner.watched);
        w.docs.remove(doc);
        w.fresh.remove(doc);
    }

    fn publish_awareness(&self, doc: &DocId, update: Bytes) {
        // Presence is best-effort: when the queue is full this change is dropped, and the
        // client's next awareness update (they are periodic) carries its newest state.
        let _ = self.submit(WriteOp::Awareness {
            doc: doc.clone(),
            update,
        });
    }

    fn lock_compaction(
        &self,
        doc: &DocId,
        ttl: Duration,
    ) -> BoxFuture<'static, BackplaneResult<bool>> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        let mut cmd = redis::cmd("SET");
        cmd.arg(lock_key(doc))
            .arg(self.inner.node.to_string())
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        async move {
            Ok(matches!(
                query(&mut conn, &cmd, timeout).await?,
                Value::Okay | Value::SimpleString(_)
            ))
        }
        .boxed()
    }

    fn unlock_compaction(&self, doc: &DocId) -> BoxFuture<'static, ()> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(UNLOCK_LUA)
            .arg(1)
            .arg(lock_key(doc))
            .arg(self.inner.node.to_string());
        async move {
            // If this fails the lock simply expires.
            let _ = query(&mut conn, &cmd, timeout).await;
        }
        .boxed()
    }

    fn publish_revocation(&self, rev: Revocation) -> BoxFuture<'static, BackplaneResult<()>> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        async move {
            let mut cmd = redis::cmd("XADD");
            // Kept generously: a subject revocation matters for as long as tokens issued before
            // it live, and entries are tiny.
            cmd.arg(REVOCATIONS_KEY)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("t")
                .arg(rev.at);
            if let Some(sub) = &rev.sub {
                cmd.arg("s").arg(sub);
            }
            if let Some(jti) = &rev.jti {
                cmd.arg("j").arg(jti);
            }
            if let Some(exp) = rev.exp {
                cmd.arg("x").arg(exp);
            }
            query(&mut conn, &cmd, timeout).await.map(drop)
        }
        .boxed()
    }

    fn watch_revocations(&self, apply: RevocationSink) -> BoxFuture<'static, ()> {
        let reader = Reader {
            inner: self.inner.clone(),
            shard: 0,
        };
        let (caught_up, rx) = oneshot::channel();
        self.tracker
            .spawn(run_revocations(reader, apply, caught_up));
        // Resolves when the reader stops, too (the node is shutting down).
        async move {
            let _ = rx.await;
        }
        .boxed()
    }

    fn ping(&self) -> BoxFuture<'static, BackplaneResult<()>> {
        let mut conn = self.inner.conn.clone();
        // Short: a readiness probe must answer well within a load balancer's own timeout.
        let timeout = self.inner.settings.timeout.min(Duration::from_secs(1));
        Box::pin(async move {
            query(&mut conn, &redis::cmd("PING"), timeout)
                .await
                .map(|_| ())
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        lock(&self.tx).take();
        let done = lock(&self.writer_done).take();
        let inner = self.inner.clone();
        async move {
            if let Some(done) = done {
                let _ = done.await;
            }
            // Readers, waker and heartbeat stop only after the writer: entries appended during
            // the drain still reach the documents (and their acks the clients).
            inner.cancel.cancel();
            let mut conn = inner.conn.clone();
            let _ = query(
                &mut conn,
                redis::cmd("DEL").arg(node_key(inner.node)),
                inner.settings.timeout,
            )
            .await;
        }
        .boxed()
    }
}

/// Origin as 25 bytes (flags, node, conn, seq), or empty for none.
fn encode_origin(origin: Option<Origin>) -> Vec<u8> {
    let Some(o) = origin else {
        return Vec::new();
    };
    let mut v = BytesMut::with_capacity(25);
    v.put_u8(if o.seq.is_some() { 3 } else { 1 });
    v.put_u64_le(o.node);
    v.put_u64_le(o.conn);
    v.put_u64_le(o.seq.unwrap_or(0));
    v.to_vec()
}

fn decode_origin(v: &[u8]) -> Option<Origin> {
    if v.len() != 25 {
        return None;
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Some(Origin {
        node: u64_at(1),
        conn: u64_at(9),
        seq: (v[0] & 2 != 0).then(|| u64_at(17)),
    })
}

// ---- writer ----------------------------------------------------------------------------------

struct DocBatch {
    doc: DocId,
    updates: Vec<(
        Bytes,
        Option<Origin>,
        oneshot::Sender<BackplaneResult<Position>>,
    )>,
}

async fn run_writer(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriteOp>) {
    while let Some(first) = rx.recv().await {
        let mut group = Vec::with_capacity(64);
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        write_group(&inner, group).await;
    }
}

/// Writes one group: per document one EVAL with all its updates (in admission order), all
/// documents concurrently, so a group costs about one round trip however many updates it has.
async fn write_group(inner: &Arc<Inner>, group: Vec<WriteOp>) {
    let mut batches: Vec<DocBatch> = Vec::new();
    let mut index: HashMap<DocId, usize> = HashMap::new();
    let mut awareness: Vec<(DocId, Bytes)> = Vec::new();
    for op in group {
        match op {
            WriteOp::Append {
                doc,
                update,
                origin,
                reply,
            } => {
                let i = match index.get(&doc) {
                    Some(&i) if batches[i].updates.len() < MAX_PER_EVAL => i,
                    _ => {
                        batches.push(DocBatch {
                            doc: doc.clone(),
                            updates: Vec::new(),
                        });
                        index.insert(doc, batches.len() - 1);
                        batches.len() - 1
                    }
                };
                batches[i].updates.push((update, origin, reply));
            }
            WriteOp::Awareness { doc, update } => awareness.push((doc, update)),
        }
    }
    // Batches of one document that overflowed MAX_PER_EVAL must still go in order: chain
    // them in one future per document.
    let mut per_doc: HashMap<DocId, Vec<DocBatch>> = HashMap::new();
    let mut order: Vec<DocId> = Vec::new();
    for b in batches {
        if !per_doc.contains_key(&b.doc) {
            order.push(b.doc.clone());
        }
        per_doc.entry(b.doc.clone()).or_default().push(b);
    }
    let append_script = script(APPEND_LUA);
    let appends = order.into_iter().filter_map(|doc| {
        let batches = per_doc.remove(&doc)?;
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        let body = append_script.clone();
        Some(async move {
            for b in batches {
                append_batch(&mut conn, &body, b, timeout).await;
            }
        })
    });
    let presence = awareness.into_iter().map(|(doc, update)| {
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        let ttl = inner.settings.presence_ttl.as_millis() as u64;
        let node = inner.node;
        async move {
            let mut pipe = redis::pipe();
            pipe.cmd("XADD")
                .arg(aw_key(&doc))
                .arg("MAXLEN")
                .arg("~")
                .arg(256)
                .arg("*")
                .arg("n")
                .arg(node.to_string())
                .arg("u")
                .arg(update.as_ref())
                .ignore()
                .cmd("PEXPIRE")
                .arg(aw_key(&doc))
                .arg(ttl.max(1000) * 2)
                .ignore();
            if let Ok(Err(e)) =
                tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await
            {
                tracing::debug!(doc = %doc, error = %e, "awareness publish failed");
            }
        }
    });
    let written: Vec<DocId> = index.into_keys().collect();
    futures_util::join!(join_all(appends), join_all(presence));
    // After the appends returned, so a woken reader finds the entries.
    wake_shards(inner, &written).await;
}

async fn append_batch(conn: &mut Conn, body: &str, batch: DocBatch, timeout: Duration) {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(body)
        .arg(2)
        .arg(meta_key(&batch.doc))
        .arg(log_key(&batch.doc))
        .arg(new_epoch());
    for (update, origin, _) in &batch.updates {
        cmd.arg(update.as_ref()).arg(encode_origin(*origin));
    }
    let result = query(conn, &cmd, timeout).await.and_then(|v| {
        let parts = as_array(v)?;
        let epoch = parse_u64(parts.first())?;
        let ids = parts[1..]
            .iter()
            .map(|v| parse_id(Some(v)))
            .collect::<BackplaneResult<Vec<_>>>()?;
        if ids.len() != batch.updates.len() {
            return Err(storage("append script answered a different number of ids"));
        }
        Ok((epoch, ids))
    });
    match result {
        Ok((epoch, ids)) => {
            for ((_, _, reply), id) in batch.updates.into_iter().zip(ids) {
                let _ = reply.send(Ok(Position::new(epoch, id)));
            }
        }
        Err(e) => {
            tracing::warn!(doc = %batch.doc, error = %e, "append to redis failed; nothing in this batch is acknowledged");
            let msg = e.to_string();
            for (_, _, reply) in batch.updates {
                let _ = reply.send(Err(BackplaneError::Storage(msg.clone())));
            }
        }
    }
}

/// Cluster mode: tells the shard readers of the written documents to look (one XADD per
/// shard per group). Standalone readers block on the document streams themselves.
async fn wake_shards(inner: &Arc<Inner>, docs: &[DocId]) {
    if !inner.settings.cluster || docs.is_empty() {
        return;
    }
    let topology = inner.topology();
    let mut by_shard: HashMap<usize, Vec<&DocId>> = HashMap::new();
    for d in docs {
        by_shard.entry(topology.shard(d)).or_default().push(d);
    }
    let timeout = inner.settings.timeout;
    join_all(by_shard.into_iter().map(|(shard, docs)| {
        let mut conn = inner.conn.clone();
        let key = topology.wake_keys[shard].clone();
        let names = docs
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        async move {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(1024)
                .arg("*")
                .arg("d")
                .arg(&names);
            // Not retried: every shard reader reads all its documents at least every BLOCK,
            // wake-ups or not, so these documents are read within about a second anyway (and
            // a retry would hold up the writer's next group while Redis is struggling).
            if let Err(e) = query_op(&mut conn, &cmd, timeout, "wake").await {
                tracing::warn!(shard, docs = %names, error = %e, "wake-up not written; the shard reader's timed full read picks these documents up");
            }
        }
    }))
    .await;
}

// ---- waker and heartbeat -------------------------------------------------------------------

/// Turns "the watched set changed" into a wake-up of the blocking reader that must now read
/// more streams: an XADD to this node's control stream (standalone) or to the shard's wake
/// stream (cluster), both of which the reader's blocking XREAD includes.
async fn run_waker(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = inner.watch_changed.notified() => {}
        }
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        if inner.settings.cluster {
            let docs: Vec<DocId> = lock(&inner.watched).fresh.iter().cloned().collect();
            wake_shards(&inner, &docs).await;
        } else {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(ctl_key(inner.node))
                .arg("MAXLEN")
                .arg("~")
                .arg(16)
                .arg("*")
                .arg("w")
                .arg(1);
            let mut pipe = redis::pipe();
            pipe.add_command(cmd)
                .ignore()
                .cmd("PEXPIRE")
                .arg(ctl_key(inner.node))
                .arg(60_000)
                .ignore();
            // If Redis is down the reader is reconnecting anyway and reads everything watched.
            count(2);
            let _ = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
        }
    }
}

const REVOCATIONS_KEY: &str = "chorus:revocations";

/// Follows the revocation stream from its start for as long as the node runs, reconnecting
/// after Redis failures and continuing after the last entry applied. Until it has read to the
/// end of the stream once, it reads without blocking; then it says so on `caught_up` (the node
/// serves nobody before that) and blocks for new entries from then on.
async fn run_revocations(reader: Reader, apply: RevocationSink, caught_up: oneshot::Sender<()>) {
    let mut caught_up = Some(caught_up);
    let mut last = "0-0".to_string();
    let mut backoff = Duration::from_millis(50);
    while !reader.inner.cancel.is_cancelled() {
        let conn = tokio::select! {
            _ = reader.inner.cancel.cancelled() => return,
            c = reader.connect() => c,
        };
        let mut conn = match conn {
            Ok(ReadConn::Single(c)) => Conn::Plain(c),
            Ok(ReadConn::Cluster(c)) => Conn::Cluster(c),
            Err(e) => {
                tracing::warn!(error = %e, "revocation reader cannot reach redis; retrying");
                tokio::select! {
                    _ = reader.inner.cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(1000);
            if caught_up.is_none() {
                cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
            }
            cmd.arg("STREAMS").arg(REVOCATIONS_KEY).arg(&last);
            let reply = tokio::select! {
                _ = reader.inner.cancel.cancelled() => return,
                r = query(&mut conn, &cmd, BLOCK + reader.inner.settings.timeout) => r,
            };
            let batches = match reply.and_then(parse_xread) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "revocation reader lost redis; reconnecting");
                    break;
                }
            };
            let mut read = 0;
            for (_, entries) in batches {
                for (id, fields) in entries {
                    read += 1;
                    if let Some(rev) = revocation_from(&fields) {
                        apply(rev);
                    }
                    last = id;
                }
            }
            if read == 0
                && let Some(done) = caught_up.take()
            {
                tracing::debug!(last = %last, "revocations caught up");
                let _ = done.send(());
            }
        }
    }
}

fn revocation_from(fields: &HashMap<String, Vec<u8>>) -> Option<Revocation> {
    let text = |k: &str| {
        fields
            .get(k)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let number = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
    let rev = Revocation {
        sub: text("s"),
        jti: text("j"),
        exp: number("x"),
        at: number("t")?,
    };
    (rev.sub.is_some() || rev.jti.is_some()).then_some(rev)
}

fn ctl_key(node: u64) -> String {
    format!("chorus:ctl:{node:016x}")
}

/// Keeps this node's heartbeat key alive and reports remote nodes whose key expired, so their
/// clients' presence disappears everywhere within about `presence_ttl`.
async fn run_heartbeat(inner: Arc<Inner>) {
    let ttl = inner.settings.presence_ttl.max(Duration::from_millis(300));
    let period = ttl / 3;
    loop {
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        let mut cmd = redis::cmd("SET");
        cmd.arg(node_key(inner.node))
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let _ = query(&mut conn, &cmd, timeout).await;
        let remote: Vec<u64> = lock(&inner.remote_nodes).iter().copied().collect();
        let checks = remote.iter().map(|n| {
            let mut conn = inner.conn.clone();
            let cmd = redis::cmd("EXISTS").arg(node_key(*n)).clone();
            async move { query(&mut conn, &cmd, timeout).await }
        });
        let results = join_all(checks).await;
        for (node, r) in remote.into_iter().zip(results) {
            // Only a clear "the key is gone" counts; Redis being unreachable is not a death.
            if let Ok(Value::Int(0)) = r {
                lock(&inner.remote_nodes).remove(&node);
                tracing::info!(
                    node = format!("{node:016x}"),
                    "node heartbeat expired; removing its presence"
                );
                if let Some(sink) = inner.sink.get().and_then(Weak::upgrade) {
                    sink.node_gone(node);
                }
            }
        }
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

// ---- reader ----------------------------------------------------------------------------------

/// One per Redis shard: the long-lived task that reads the streams of every document watched
/// on this node and hands entries to the sink in stream order.
///
/// Standalone: one blocking `XREAD` over the control stream, every watched log and awareness
/// stream (many streams per call); a `watch` wakes it through the control stream.
/// Cluster: a blocking XREAD may only name keys of one hash slot, so the shard reader blocks on
/// its shard's wake stream (written once per write group by every node) and then reads the
/// named documents (log + awareness in one XREAD, same slot), all concurrently. At least every
/// `BLOCK` it reads all its documents, however busy the wake stream is with other documents, so
/// a wake-up that was lost (a failed XADD, a writer with an older slot map) delays a document
/// by about a second, never longer.
/// Either way it keeps a cursor per document and, after Redis comes back, continues from it;
/// after a reconnect or a stall it asks its documents to recheck their logs (see
/// [`EntrySink::recheck`]).
struct Reader {
    inner: Arc<Inner>,
    shard: usize,
}

/// A dedicated connection for blocking reads: a blocked XREAD must not hold up other commands.
enum ReadConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// Whether a reader's connection is its first one or replaces one that failed (entries may
/// have been trimmed while it was away).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    First,
    Reconnect,
}

/// When the reader last completed a read, to notice a stall longer than
/// [`super::READER_STALL`] (a paused process, a slow network); and whether its documents still
/// have to recheck their logs (after such a stall, or on a connection that replaced a failed
/// one).
struct ReadClock {
    last: tokio::time::Instant,
    recheck_due: bool,
}

impl ReadClock {
    fn new(start: Start) -> Self {
        ReadClock {
            last: tokio::time::Instant::now(),
            recheck_due: start == Start::Reconnect,
        }
    }

    /// A read completed: whether a recheck is due (this one came more than `READER_STALL`
    /// after the one before, or an earlier one is still due).
    fn lap(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.last) > super::READER_STALL {
            self.recheck_due = true;
        }
        self.last = now;
        self.recheck_due
    }
}

impl Reader {
    async fn connect(&self) -> BackplaneResult<ReadConn> {
        match &self.inner.client {
            Client::Single(c) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.inner.settings.timeout))
                    .set_response_timeout(None);
                Ok(ReadConn::Single(
                    c.get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(storage)?,
                ))
            }
            Client::Cluster(c) => Ok(ReadConn::Cluster(
                c.get_async_connection().await.map_err(storage)?,
            )),
        }
    }

    async fn run(self) {
        let mut backoff = Duration::from_millis(50);
        let mut start = Start::First;
        while !self.inner.cancel.is_cancelled() {
            if lock(&self.inner.shards).keep_reader(self.shard).is_none() {
                tracing::info!(
                    shard = self.shard,
                    "the cluster has fewer masters; shard reader stops"
                );
                return;
            }
            let conn = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                c = self.connect() => c,
            };
            let result = match conn {
                Ok(ReadConn::Single(c)) => {
                    backoff = Duration::from_millis(50);
                    self.run_single(Conn::Plain(c), start).await
                }
                Ok(ReadConn::Cluster(c)) => {
                    backoff = Duration::from_millis(50);
                    self.run_cluster(Conn::Cluster(c), start).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(e) => {
                    metrics::counter!(crate::metrics::names::REDIS_ERRORS, "op" => "read")
                        .increment(1);
                    tracing::warn!(shard = self.shard, error = %e, "redis reader lost its connection; reconnecting and continuing from the last delivered ids");
                    if self.inner.settings.cluster {
                        // Maybe MOVED/ASK/CLUSTERDOWN: the slot map may have changed.
                        self.inner.topology_stale.notify_one();
                    }
                    // Only failures that reach us count: the cluster client reconnects and
                    // retries on its own, which is fine, because a gap long enough for a trim
                    // to overtake the cursor also shows as a stall (see `ReadClock`).
                    start = Start::Reconnect;
                }
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn mine(&self, topology: &Topology, doc: &DocId) -> bool {
        !self.inner.settings.cluster || topology.shard(doc) == self.shard
    }

    fn my_docs(&self, topology: &Topology) -> Vec<(DocId, Cursor)> {
        let w = lock(&self.inner.watched);
        w.docs
            .iter()
            .filter(|(d, _)| self.mine(topology, d))
            .map(|(d, c)| (d.clone(), *c))
            .collect()
    }

    /// This reader's documents and those of them watched since it last looked, under one
    /// lock: a `watch` between listing and taking would leave a document marked as seen that
    /// is not in the list. Fresh documents of other shards stay for their own reader.
    fn take_docs(&self, topology: &Topology) -> (Vec<(DocId, Cursor)>, HashSet<DocId>) {
        let mut w = lock(&self.inner.watched);
        let docs = w
            .docs
            .iter()
            .filter(|(d, _)| self.mine(topology, d))
            .map(|(d, c)| (d.clone(), *c))
            .collect();
        let (fresh, others): (HashSet<DocId>, HashSet<DocId>) = std::mem::take(&mut w.fresh)
            .into_iter()
            .partition(|d| self.mine(topology, d));
        w.fresh = others;
        (docs, fresh)
    }

    /// After a completed read: if a recheck is due, asks every document this reader reads to
    /// recheck its log (entries may have been trimmed while the reader was away or stalled).
    /// The documents re-read through the shared connection, which reconnects on its own
    /// schedule, and a document whose re-read fails waits for its next entry: so they are
    /// asked only once that connection answers (else again after the next read).
    async fn recheck_if_due(&self, clock: &mut ReadClock, docs: &[(DocId, Cursor)]) {
        if !clock.lap() {
            return;
        }
        let mut conn = self.inner.conn.clone();
        if query(&mut conn, &redis::cmd("PING"), self.inner.settings.timeout)
            .await
            .is_err()
        {
            return;
        }
        clock.recheck_due = false;
        if docs.is_empty() {
            return;
        }
        tracing::info!(
            shard = self.shard,
            docs = docs.len(),
            "redis reader was away; its documents recheck their logs"
        );
        if let Some(sink) = self.inner.sink.get().and_then(Weak::upgrade) {
            for (d, _) in docs {
                sink.recheck(d);
            }
        }
    }

    /// The standalone loop: block on everything at once.
    async fn run_single(&self, mut conn: Conn, start: Start) -> BackplaneResult<()> {
        let ctl = ctl_key(self.inner.node);
        let mut ctl_last = StreamId::new(super::now_ms(), 0).to_string();
        let mut clock = ReadClock::new(start);
        let topology = self.inner.topology();
        loop {
            // The blocking XREAD names every watched document, fresh or not.
            let (docs, _fresh) = self.take_docs(&topology);
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&ctl);
            for (d, _) in &docs {
                cmd.arg(log_key(d)).arg(aw_key(d));
            }
            cmd.arg(&ctl_last);
            for (_, c) in &docs {
                cmd.arg(c.log.to_string()).arg(c.aw.to_string());
            }
            let reply = tokio::select! {
                _ = self.inner.cancel.cancelled() => return Ok(()),
                r = query(&mut conn, &cmd, BLOCK + self.inner.settings.timeout) => r?,
            };
            self.recheck_if_due(&mut clock, &docs).await;
            for (key, entries) in parse_xread(reply)? {
                if key == ctl {
                    if let Some((id, _)) = entries.last() {
                        ctl_last = id.clone();
                    }
                    continue;
                }
                self.handle_stream(&key, entries, &docs);
            }
        }
    }

    /// The cluster loop: block on the shard's wake stream, then read the named documents, and
    /// all of them at least every `BLOCK`.
    async fn run_cluster(&self, mut conn: Conn, start: Start) -> BackplaneResult<()> {
        let mut wake = String::new();
        let mut wake_last = String::new();
        // None: read everything watched (after (re)connecting, a new slot map, or a timed-out
        // block). Entries may have arrived meanwhile.
        let mut todo: Option<HashSet<String>> = None;
        let mut last_full = tokio::time::Instant::now();
        let mut clock = ReadClock::new(start);
        loop {
            let Some(topology) = lock(&self.inner.shards).keep_reader(self.shard) else {
                tracing::info!(
                    shard = self.shard,
                    "the cluster has fewer masters; shard reader stops"
                );
                return Ok(());
            };
            if topology.wake_keys[self.shard] != wake {
                // First round, or the slot map changed: block on the new key from now on.
                // Wake-ups written to it before now are covered by the full read below.
                wake = topology.wake_keys[self.shard].clone();
                wake_last = StreamId::new(super::now_ms().saturating_sub(1), 0).to_string();
                todo = None;
            }
            let (docs, fresh) = self.take_docs(&topology);
            let started = tokio::time::Instant::now();
            // Also on a timer: under steady wake traffic for other documents, a document whose
            // wake-up was lost would otherwise wait until the shard goes quiet for a whole BLOCK.
            let full = todo.is_none() || started.duration_since(last_full) >= BLOCK;
            let selected: Vec<(DocId, Cursor)> = if full {
                docs.clone()
            } else {
                docs.iter()
                    .filter(|(d, _)| {
                        todo.as_ref().is_some_and(|t| t.contains(d.as_str())) || fresh.contains(d)
                    })
                    .cloned()
                    .collect()
            };
            self.read_docs(&conn, &selected, &docs, &topology).await?;
            if full {
                last_full = started;
            }
            self.recheck_if_due(&mut clock, &docs).await;
            let block = BLOCK.saturating_sub(last_full.elapsed()).max(MIN_BLOCK);
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&wake)
                .arg(&wake_last);
            let reply = tokio::select! {
                _ = self.inner.cancel.cancelled() => return Ok(()),
                r = query(&mut conn, &cmd, block + self.inner.settings.timeout) => r?,
            };
            self.recheck_if_due(&mut clock, &docs).await;
            let mut named = HashSet::new();
            let mut woken = false;
            for (_, entries) in parse_xread(reply)? {
                for (id, fields) in entries {
                    woken = true;
                    wake_last = id;
                    if let Some(d) = fields.get("d") {
                        named.extend(String::from_utf8_lossy(d).split(' ').map(str::to_owned));
                    }
                }
            }
            // A timed-out block reads everything.
            todo = woken.then_some(named);
        }
    }

    /// Reads documents (log and awareness, one XREAD each, same slot) until each is drained.
    async fn read_docs(
        &self,
        conn: &Conn,
        selected: &[(DocId, Cursor)],
        docs: &[(DocId, Cursor)],
        topology: &Topology,
    ) -> BackplaneResult<()> {
        let timeout = self.inner.settings.timeout;
        let results = join_all(selected.iter().map(|(d, c)| {
            let mut conn = conn.clone_for_read();
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("STREAMS")
                .arg(log_key(d))
                .arg(aw_key(d))
                .arg(c.log.to_string())
                .arg(c.aw.to_string());
            async move { query(&mut conn, &cmd, timeout).await }
        }))
        .await;
        let mut again = Vec::new();
        for ((d, _), r) in selected.iter().zip(results) {
            for (key, entries) in parse_xread(r?)? {
                if entries.len() >= READ_COUNT {
                    again.push(d.clone());
                }
                self.handle_stream(&key, entries, docs);
            }
        }
        if !again.is_empty() {
            let more: Vec<(DocId, Cursor)> = self
                .my_docs(topology)
                .into_iter()
                .filter(|(d, _)| again.contains(d))
                .collect();
            Box::pin(self.read_docs(conn, &more, &more, topology)).await?;
        }
        Ok(())
    }

    /// Delivers one stream's entries and moves the document's cursor past them.
    fn handle_stream(
        &self,
        key: &str,
        entries: Vec<(String, HashMap<String, Vec<u8>>)>,
        docs: &[(DocId, Cursor)],
    ) {
        let Some((doc, kind)) = parse_key(key) else {
            return;
        };
        let Some((_, cursor)) = docs.iter().find(|(d, _)| *d == doc) else {
            return;
        };
        let Some(last) = entries.last().and_then(|(id, _)| parse_stream_id(id)) else {
            return;
        };
        let sink = self.inner.sink.get().and_then(Weak::upgrade);
        match kind {
            Kind::Log => {
                let mut run: Vec<Entry> = Vec::new();
                let mut run_epoch = 0;
                for (id, fields) in entries {
                    let Some((epoch, entry)) = entry_from(&id, &fields) else {
                        tracing::warn!(doc = %doc, id, "unreadable log entry skipped");
                        continue;
                    };
                    if epoch != run_epoch
                        && !run.is_empty()
                        && let Some(s) = &sink
                    {
                        s.deliver(&doc, run_epoch, std::mem::take(&mut run));
                    }
                    run_epoch = epoch;
                    run.push(entry);
                }
                if let (Some(s), false) = (&sink, run.is_empty()) {
                    s.deliver(&doc, run_epoch, run);
                }
            }
            Kind::Awareness => {
                for (_, fields) in entries {
                    let node = fields
                        .get("n")
                        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok());
                    let (Some(node), Some(update)) = (node, fields.get("u")) else {
                        continue;
                    };
                    if node == self.inner.node {
                        continue;
                    }
                    lock(&self.inner.remote_nodes).insert(node);
                    if let Some(s) = &sink {
                        s.deliver_awareness(&doc, node, Bytes::copy_from_slice(update));
                    }
                }
            }
        }
        let mut w = lock(&self.inner.watched);
        if let Some(c) = w.docs.get_mut(&doc)
            && c.generation == cursor.generation
        {
            match kind {
                Kind::Log => c.log = c.log.max(last),
                Kind::Awareness => c.aw = c.aw.max(last),
            }
        }
    }
}

impl Conn {
    /// Another handle on the same connection (both kinds multiplex).
    fn clone_for_read(&self) -> Conn {
        self.clone()
    }
}

// ---- reply parsing ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Log,
    Awareness,
}

/// `chorus:{DOC}:log` / `chorus:{DOC}:aw` → (doc, kind).
fn parse_key(key: &str) -> Option<(DocId, Kind)> {
    let rest = key.strip_prefix("chorus:{")?;
    let (doc, suffix) = rest.rsplit_once("}:")?;
    let kind = match suffix {
        "log" => Kind::Log,
        "aw" => Kind::Awareness,
        _ => return None,
    };
    Some((DocId::parse(doc).ok()?, kind))
}

fn parse_stream_id(s: &str) -> Option<StreamId> {
    let (ms, seq) = s.split_once('-')?;
    Some(StreamId::new(ms.parse().ok()?, seq.parse().ok()?))
}

fn bad(what: &str) -> BackplaneError {
    BackplaneError::Storage(format!("unexpected redis reply: {what}"))
}

fn as_array(v: Value) -> BackplaneResult<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(bad(&format!("expected an array, got {other:?}"))),
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

fn as_string(v: Option<&Value>) -> Option<String> {
    v.and_then(as_bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

fn as_u64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

fn parse_u64(v: Option<&Value>) -> BackplaneResult<u64> {
    as_u64(v).ok_or_else(|| bad("expected a number"))
}

fn parse_id(v: Option<&Value>) -> BackplaneResult<StreamId> {
    as_string(v)
        .as_deref()
        .and_then(parse_stream_id)
        .ok_or_else(|| bad("expected a stream id"))
}

type RawEntry = (String, HashMap<String, Vec<u8>>);

/// `[[id, [field, value, ...]], ...]` → entries with their fields.
fn parse_raw_entries(v: Value) -> BackplaneResult<Vec<RawEntry>> {
    let mut out = Vec::new();
    for e in as_array(v)? {
        let mut parts = as_array(e)?.into_iter();
        let id = as_string(parts.next().as_ref()).ok_or_else(|| bad("entry id"))?;
        let mut fields = HashMap::new();
        let kv = match parts.next() {
            Some(Value::Map(m)) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            Some(v) => as_array(v)?,
            None => Vec::new(),
        };
        let mut kv = kv.into_iter();
        while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
            if let (Some(k), Value::BulkString(v)) = (as_string(Some(&k)), v) {
                fields.insert(k, v);
            }
        }
        out.push((id, fields));
    }
    Ok(out)
}

fn entry_from(id: &str, fields: &HashMap<String, Vec<u8>>) -> Option<(u64, Entry)> {
    let epoch = std::str::from_utf8(fields.get("e")?).ok()?.parse().ok()?;
    let update = Bytes::copy_from_slice(fields.get("u")?);
    let origin = fields.get("o").and_then(|o| decode_origin(o));
    Some((
        epoch,
        Entry {
            id: parse_stream_id(id)?,
            update,
            origin,
        },
    ))
}

/// XRANGE reply → (epoch, entry) pairs.
fn parse_entries(v: Value) -> BackplaneResult<Vec<(u64, Entry)>> {
    Ok(parse_raw_entries(v)?
        .iter()
        .filter_map(|(id, f)| entry_from(id, f))
        .collect())
}

/// XREAD reply (RESP2 array or RESP3 map) → (key, entries) per stream that had any.
fn parse_xread(v: Value) -> BackplaneResult<Vec<(String, Vec<RawEntry>)>> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m,
        other => as_array(other)?
            .into_iter()
            .filter_map(|s| {
                let mut p = as_array(s).ok()?.into_iter();
                Some((p.next()?, p.next()?))
            })
            .collect(),
    };
    streams
        .into_iter()
        .map(|(k, e)| {
            let key = as_string(Some(&k)).ok_or_else(|| bad("stream key"))?;
            Ok((key, parse_raw_entries(e)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_doc_as_hash_tag_and_parse_back() {
        let doc = DocId::parse("a:b@c").expect("doc");
        assert_eq!(log_key(&doc), "chorus:{a:b@c}:log");
        assert!(matches!(parse_key(&log_key(&doc)), Some((d, Kind::Log)) if d == doc));
        assert!(matches!(parse_key(&aw_key(&doc)), Some((d, Kind::Awareness)) if d == doc));
        // Same slot for every key of a document.
        assert_eq!(slot_of("a:b@c"), slot_of("a:b@c"));
    }

    #[test]
    fn origins_round_trip() {
        for o in [
            None,
            Some(Origin {
                node: 1,
                conn: 2,
                seq: Some(3),
            }),
            Some(Origin {
                node: u64::MAX,
                conn: 0,
                seq: None,
            }),
        ] {
            assert_eq!(decode_origin(&encode_origin(o)), o);
        }
    }

    /// A CLUSTER SLOTS reply: (first slot, last slot, master port) per range.
    fn slots_reply(ranges: &[(u16, u16, u16)]) -> Value {
        Value::Array(
            ranges
                .iter()
                .map(|&(start, end, port)| {
                    Value::Array(vec![
                        Value::Int(i64::from(start)),
                        Value::Int(i64::from(end)),
                        Value::Array(vec![
                            Value::BulkString(b"127.0.0.1".to_vec()),
                            Value::Int(i64::from(port)),
                        ]),
                    ])
                })
                .collect(),
        )
    }

    fn topology(ranges: &[(u16, u16, u16)]) -> Topology {
        parse_cluster_slots(slots_reply(ranges)).expect("slot map")
    }

    const THREE: &[(u16, u16, u16)] = &[(0, 5460, 1), (5461, 10922, 2), (10923, 16383, 3)];

    #[test]
    fn a_reshard_changes_the_map_and_the_same_map_changes_nothing() {
        let mut shards = Shards::new(Topology::single());
        assert_eq!(shards.install(topology(THREE)), vec![0, 1, 2]);
        let before = shards.keep_reader(0).expect("shard 0");
        // The periodic refresh of an unchanged cluster: same map, nobody restarts.
        assert!(shards.install(topology(THREE)).is_empty());
        assert!(Arc::ptr_eq(
            &before,
            &shards.keep_reader(0).expect("shard 0")
        ));
        // Slots 0..=1999 move from the first master to the second: readers see the new map.
        let moved = topology(&[
            (0, 1999, 2),
            (2000, 5460, 1),
            (5461, 10922, 2),
            (10923, 16383, 3),
        ]);
        assert!(shards.install(moved).is_empty());
        let after = shards.keep_reader(0).expect("shard 0");
        assert!(!Arc::ptr_eq(&before, &after));
        let doc = (0..)
            .map(|i| DocId::parse(&format!("d{i}")).expect("doc"))
            .find(|d| slot_of(d.as_str()) < 2000)
            .expect("a document in the moved slots");
        let master_of = |t: &Topology, d: &DocId| t.wake_keys[t.shard(d)].clone();
        let second_master = (0..)
            .map(|i| DocId::parse(&format!("e{i}")).expect("doc"))
            .find(|d| (5461..=10922).contains(&slot_of(d.as_str())))
            .expect("a document of the second master");
        assert_ne!(master_of(&before, &doc), master_of(&before, &second_master));
        assert_eq!(master_of(&after, &doc), master_of(&after, &second_master));
    }

    #[test]
    fn every_node_picks_the_same_wake_key_per_master_whatever_the_reply_order() {
        let a = topology(THREE);
        let b = topology(&[(10923, 16383, 3), (0, 5460, 1), (5461, 10922, 2)]);
        let mut ka = a.wake_keys.clone();
        let mut kb = b.wake_keys.clone();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb);
        for i in 0..100 {
            let d = DocId::parse(&format!("doc-{i}")).expect("doc");
            assert_eq!(a.wake_keys[a.shard(&d)], b.wake_keys[b.shard(&d)]);
            // The wake key lives on the master it wakes for.
            let key = &a.wake_keys[a.shard(&d)];
            let tag = key
                .strip_prefix("chorus:{")
                .and_then(|k| k.strip_suffix("}:wake"))
                .expect("wake key");
            assert_eq!(
                a.shard_of_slot[usize::from(slot_of(tag))],
                a.shard_of_slot[usize::from(slot_of(d.as_str()))]
            );
        }
    }

    #[test]
    fn readers_follow_the_number_of_masters() {
        let mut shards = Shards::new(Topology::single());
        assert_eq!(shards.install(topology(THREE)), vec![0, 1, 2]);
        // A fourth master gets slots: one more reader, the others keep running.
        let four = &[
            (0, 4000, 1),
            (4001, 5460, 4),
            (5461, 10922, 2),
            (10923, 16383, 3),
        ];
        assert_eq!(shards.install(topology(four)), vec![3]);
        assert!(shards.keep_reader(3).is_some());
        // It is emptied again: the reader of the last shard index stops...
        assert!(shards.install(topology(THREE)).is_empty());
        assert!(shards.keep_reader(3).is_none());
        assert!(shards.keep_reader(2).is_some());
        // ...and if the cluster grows again, that shard gets a reader again.
        assert_eq!(shards.install(topology(four)), vec![3]);
        // A shard whose reader still runs is not started twice.
        assert!(shards.install(topology(four)).is_empty());
    }

    #[test]
    fn a_slot_map_without_masters_is_refused() {
        assert!(parse_cluster_slots(Value::Array(Vec::new())).is_err());
        assert!(parse_cluster_slots(Value::Nil).is_err());
    }

    #[test]
    fn cluster_seeds_parse() {
        let s = RedisSettings::from_urls(
            &["redis+cluster://h1:1,h2:2".into()],
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        assert!(s.cluster);
        assert_eq!(s.urls, vec!["redis://h1:1", "redis://h2:2"]);
        let s = RedisSettings::from_urls(&["redis://h:1".into()], Duration::ZERO, Duration::ZERO);
        assert!(!s.cluster);
    }
}
