//! The Redis backplane (data-flow steps 4–5 across nodes): XADD batches in, XREAD readers out.
//!
//! Key layout, all keys of a document in one hash slot (the document id is the hash tag; the
//! `DocId` alphabet has no braces):
//!
//! - `chorus:{DOC}:log`  — the stream; fields `e` (epoch), `u` (yrs v1 update), `o` (origin)
//! - `chorus:{DOC}:meta` — hash: `epoch`, `floor` (id of the newest trimmed entry)
//! - `chorus:{DOC}:aw`   — short-lived awareness stream; fields `n` (node), `u` (update)
//! - `chorus:{DOC}:lock` — compaction lock (`SET NX PX`), value = node id
//! - `chorus:{DOC}:hooks` — hash: webhook URL → last delivered position (`epoch.ms-seq`)
//! - `chorus:{DOC}:hooklease` — webhook sending lease (`SET NX PX`, renewed), value = node id
//! - `chorus:hooks:undelivered` — set of documents with undelivered webhooks (set by the
//!   append script while webhooks are on; standalone)
//! - `chorus:{N}:undelivered` — the same per hash slot (cluster): N is the smallest number
//!   hashing to the slot, so a document's mark shares its slot (`hooks.rs`)
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

mod cluster;
mod conn;
mod hooks;
mod keys;
mod nodes;
mod reader;
mod reply;
mod revocations;
mod scripts;
mod writer;

pub use conn::commands_sent;

use self::cluster::{Shards, Topology, cluster_topology, run_topology};
use self::conn::{Conn, lock, query, storage};
use self::keys::{lock_key, node_key};
use self::nodes::{run_heartbeat, run_waker};
use self::reader::{Reader, spawn_reader};
use self::reply::parse_read;
use self::revocations::run_revocations;
use self::scripts::{READ_LUA, TRIM_LUA, UNLOCK_LUA, eval, script};
use self::writer::{QUEUE_CAPACITY, WriteOp, run_writer};
use super::{
    Backplane, BackplaneError, BackplaneResult, Entry, EntrySink, LogHead, Origin, Revocation,
    RevocationSink, answer,
};
use crate::validate::Reach;
use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::Value;
use redis::aio::ConnectionManagerConfig;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// Webhooks are on: appends mark their document as undelivered (`hooks.rs`).
    hooks_on: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn topology(&self) -> Arc<Topology> {
        lock(&self.shards).topology.clone()
    }

    fn mark_sets(&self) -> keys::MarkSets {
        match self.client {
            Client::Single(_) => keys::MarkSets::Global,
            Client::Cluster(_) => keys::MarkSets::PerSlot,
        }
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
            hooks_on: Default::default(),
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
        // The entry comes back through XREAD as new bytes; its owner scans it (see
        // `Entry::reach`).
        _reach: Option<Reach>,
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
        async move { parse_read(query(&mut conn, &cmd, timeout).await?) }.boxed()
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
        revocations::publish(self.inner.conn.clone(), self.inner.settings.timeout, rev).boxed()
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

    fn enable_webhooks(
        &self,
    ) -> BackplaneResult<Arc<dyn crate::backplane::webhook_store::WebhookStore>> {
        hooks::enable(&self.inner)
    }

    fn check_webhooks(&self) -> BoxFuture<'static, BackplaneResult<()>> {
        let inner = self.inner.clone();
        Box::pin(async move { hooks::check(&inner).await })
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

#[cfg(test)]
mod tests {
    use super::*;

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
