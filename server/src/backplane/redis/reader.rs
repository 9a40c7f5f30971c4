//! Redis backplane, read side (data-flow step 5): shard readers hand entries to the sink in order.

use super::cluster::Topology;
use super::conn::{Conn, lock, query, storage};
use super::keys::{Kind, aw_key, ctl_key, log_key, parse_key};
use super::reply::{entry_from, parse_stream_id, parse_xread};
use super::{Client, Cursor, Inner};
use crate::backplane::{BackplaneResult, Entry};
use bytes::Bytes;
use chorus_protocol::{DocId, StreamId};
use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Most entries one XREAD returns per stream; the reader comes back for the rest at once.
const READ_COUNT: usize = 1024;
/// How long a blocking XREAD waits before it re-checks; in cluster mode also the longest a
/// shard reader goes without reading all its documents, wake-ups or not.
pub(super) const BLOCK: Duration = Duration::from_millis(1000);
/// Shortest blocking XREAD a cluster reader issues when its next full read is nearly due
/// (`BLOCK 0` would mean "forever").
const MIN_BLOCK: Duration = Duration::from_millis(10);

pub(super) fn spawn_reader(inner: &Arc<Inner>, shard: usize) {
    let reader = Reader {
        inner: inner.clone(),
        shard,
    };
    inner.tracker.spawn(reader.run());
}

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
/// [`crate::backplane::EntrySink::recheck`]).
pub(super) struct Reader {
    pub(super) inner: Arc<Inner>,
    pub(super) shard: usize,
}

/// A dedicated connection for blocking reads: a blocked XREAD must not hold up other commands.
pub(super) enum ReadConn {
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
/// [`crate::backplane::READER_STALL`] (a paused process, a slow network); and whether its
/// documents still have to recheck their logs (after such a stall, or on a connection that
/// replaced a failed one).
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
        if now.duration_since(self.last) > crate::backplane::READER_STALL {
            self.recheck_due = true;
        }
        self.last = now;
        self.recheck_due
    }
}

impl Reader {
    pub(super) async fn connect(&self) -> BackplaneResult<ReadConn> {
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
        let mut ctl_last = StreamId::new(crate::backplane::now_ms(), 0).to_string();
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
                wake_last =
                    StreamId::new(crate::backplane::now_ms().saturating_sub(1), 0).to_string();
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
