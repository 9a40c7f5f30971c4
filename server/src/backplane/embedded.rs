//! The embedded backplane: each document's log in one local redb file, fsynced before an ack.
//!
//! Why redb and not a hand-rolled append file: we need per-document range reads (replay after
//! a position), range deletes (trim after a snapshot), a small metadata row per document
//! (epoch, last id, trim floor) updated atomically with the entries, and crash safety — redb
//! gives all four with copy-on-write pages and a checksummed commit, so `kill -9` (or power
//! loss) at any point leaves either the old or the new state. Plain files would need our own
//! index, compaction and torn-write recovery.
//!
//! One writer thread owns all writes and commits in groups: it takes every append waiting at
//! that moment (up to a bound), writes them in one transaction, fsyncs once, and only then
//! answers the appenders and hands the entries to the sink. Under load the fsync cost is
//! shared by the whole group, so throughput grows with concurrency instead of being capped at
//! one update per fsync.

use super::{
    Backplane, BackplaneError, BackplaneResult, Entry, EntrySink, LogHead, Origin, answer,
    new_epoch, next_id, now_ms,
};
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

/// (doc, ms, seq) → origin header + update bytes.
const LOG: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("log");
/// doc → (epoch, last ms, last seq, floor ms, floor seq).
const META: TableDefinition<&str, (u64, u64, u64, u64, u64)> = TableDefinition::new("meta");

/// Appends admitted but not yet written. Past this, `append` answers `Overloaded` at once
/// rather than queueing without bound.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Most operations written in one transaction (one fsync).
const MAX_GROUP: usize = 2048;

const ORIGIN_HEADER: usize = 25;

enum WriteOp {
    Open {
        doc: DocId,
        reply: oneshot::Sender<BackplaneResult<LogHead>>,
    },
    Append {
        doc: DocId,
        update: Bytes,
        origin: Option<Origin>,
        reply: oneshot::Sender<BackplaneResult<Position>>,
    },
    Trim {
        doc: DocId,
        before: StreamId,
        reply: oneshot::Sender<BackplaneResult<()>>,
    },
}

pub struct EmbeddedBackplane {
    db: Arc<Database>,
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    sink: Arc<OnceLock<Weak<dyn EntrySink>>>,
    tracker: TaskTracker,
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
}

fn storage<E: std::fmt::Display>(e: E) -> BackplaneError {
    BackplaneError::Storage(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmbeddedBackplane {
    /// Opens (or creates) `path` and starts the writer on `tracker`. `cache_bytes` bounds
    /// redb's page cache (its default, 1 GiB, would let the log's recent pages grow the
    /// process by as much as was written); hot documents keep their own recent entries, so
    /// the cache mostly serves loads and catch-ups.
    pub fn open(path: &Path, cache_bytes: usize, tracker: &TaskTracker) -> BackplaneResult<Self> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(storage)?;
        // Create both tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(LOG).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        txn.commit().map_err(storage)?;

        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let sink: Arc<OnceLock<Weak<dyn EntrySink>>> = Arc::new(OnceLock::new());
        let (done_tx, done_rx) = oneshot::channel();
        let writer = Writer {
            db: db.clone(),
            sink: sink.clone(),
        };
        tracker.spawn_blocking(move || {
            writer.run(rx);
            let _ = done_tx.send(());
        });
        Ok(EmbeddedBackplane {
            db,
            tx: Mutex::new(Some(tx)),
            sink,
            tracker: tracker.clone(),
            writer_done: Mutex::new(Some(done_rx)),
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
}

impl Backplane for EmbeddedBackplane {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn open(&self, doc: &DocId) -> BoxFuture<'static, BackplaneResult<LogHead>> {
        let (reply, rx) = oneshot::channel();
        answer(
            self.submit(WriteOp::Open {
                doc: doc.clone(),
                reply,
            }),
            rx,
        )
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
        let db = self.db.clone();
        let doc = doc.clone();
        let task = self
            .tracker
            .spawn_blocking(move || read_after(&db, &doc, after));
        async move { task.await.map_err(storage)? }.boxed()
    }

    fn trim(&self, doc: &DocId, before: StreamId) -> BoxFuture<'static, BackplaneResult<()>> {
        let (reply, rx) = oneshot::channel();
        answer(
            self.submit(WriteOp::Trim {
                doc: doc.clone(),
                before,
                reply,
            }),
            rx,
        )
    }

    fn attach(&self, sink: Weak<dyn EntrySink>) {
        let _ = self.sink.set(sink);
    }

    // Every append is delivered to the sink, which routes by document: nothing to track.
    fn watch(&self, _doc: &DocId, _after: StreamId) {}

    fn unwatch(&self, _doc: &DocId) {}

    fn close(&self) -> BoxFuture<'static, ()> {
        // Dropping the sender lets the writer finish what was admitted, then stop.
        lock(&self.tx).take();
        let done = lock(&self.writer_done).take();
        async move {
            if let Some(done) = done {
                let _ = done.await;
            }
        }
        .boxed()
    }
}

fn read_after(
    db: &Database,
    doc: &DocId,
    after: StreamId,
) -> BackplaneResult<(LogHead, Vec<Entry>)> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let head = match meta.get(doc.as_str()).map_err(storage)? {
        Some(v) => head_from(v.value()),
        None => LogHead {
            epoch: 0,
            last: StreamId::ZERO,
            floor: StreamId::ZERO,
        },
    };
    let log = txn.open_table(LOG).map_err(storage)?;
    let from = after.successor();
    let mut entries = Vec::new();
    for row in log
        .range((doc.as_str(), from.ms, from.seq)..=(doc.as_str(), u64::MAX, u64::MAX))
        .map_err(storage)?
    {
        let (k, v) = row.map_err(storage)?;
        let (_, ms, seq) = k.value();
        let (origin, update) = decode_value(v.value())?;
        entries.push(Entry {
            id: StreamId::new(ms, seq),
            update,
            origin,
        });
    }
    Ok((head, entries))
}

fn head_from((epoch, lms, lseq, fms, fseq): (u64, u64, u64, u64, u64)) -> LogHead {
    LogHead {
        epoch,
        last: StreamId::new(lms, lseq),
        floor: StreamId::new(fms, fseq),
    }
}

fn head_to(h: &LogHead) -> (u64, u64, u64, u64, u64) {
    (h.epoch, h.last.ms, h.last.seq, h.floor.ms, h.floor.seq)
}

fn encode_value(origin: Option<Origin>, update: &[u8]) -> BytesMut {
    let mut v = BytesMut::with_capacity(ORIGIN_HEADER + update.len());
    let flags = match origin {
        None => 0u8,
        Some(Origin { seq: None, .. }) => 1,
        Some(Origin { seq: Some(_), .. }) => 3,
    };
    let o = origin.unwrap_or(Origin {
        node: 0,
        conn: 0,
        seq: None,
    });
    v.put_u8(flags);
    v.put_u64_le(o.node);
    v.put_u64_le(o.conn);
    v.put_u64_le(o.seq.unwrap_or(0));
    v.put_slice(update);
    v
}

fn decode_value(v: &[u8]) -> BackplaneResult<(Option<Origin>, Bytes)> {
    if v.len() < ORIGIN_HEADER {
        return Err(BackplaneError::Storage(
            "log entry shorter than its header".into(),
        ));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let origin = match v[0] {
        0 => None,
        flags => Some(Origin {
            node: u64_at(1),
            conn: u64_at(9),
            seq: (flags & 2 != 0).then(|| u64_at(17)),
        }),
    };
    Ok((origin, Bytes::copy_from_slice(&v[ORIGIN_HEADER..])))
}

/// How long a commit waits for more appends when the log is busy.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(2);
/// The log counts as busy when the previous commit ended less than this ago.
const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(5);

fn take_waiting(rx: &mut mpsc::Receiver<WriteOp>, group: &mut Vec<WriteOp>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(op) => group.push(op),
            Err(_) => break,
        }
    }
}

struct Writer {
    db: Arc<Database>,
    sink: Arc<OnceLock<Weak<dyn EntrySink>>>,
}

/// What a committed group hands out once the fsync returned.
enum Done {
    Open(oneshot::Sender<BackplaneResult<LogHead>>, LogHead),
    Append(oneshot::Sender<BackplaneResult<Position>>, Position),
    Trim(oneshot::Sender<BackplaneResult<()>>),
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut last_commit: Option<std::time::Instant> = None;
        while let Some(first) = rx.blocking_recv() {
            let mut group = Vec::with_capacity(64);
            group.push(first);
            take_waiting(&mut rx, &mut group);
            // Under sustained load (the last commit just ended), wait a moment for more
            // appends so that one commit and one fsync cover them all. A lone writer (the
            // log was quiet) commits at once.
            if group.len() < MAX_GROUP && last_commit.is_some_and(|t| t.elapsed() < BUSY_WITHIN) {
                std::thread::sleep(COMMIT_DELAY);
                take_waiting(&mut rx, &mut group);
            }
            self.commit_group(group);
            last_commit = Some(std::time::Instant::now());
        }
    }

    fn commit_group(&self, group: Vec<WriteOp>) {
        let mut done = Vec::with_capacity(group.len());
        let mut delivered: Vec<(DocId, u64, Vec<Entry>)> = Vec::new();
        let result = self.write(group, &mut done, &mut delivered);
        match result {
            Ok(()) => {
                for d in done {
                    match d {
                        Done::Open(r, h) => drop(r.send(Ok(h))),
                        Done::Append(r, p) => drop(r.send(Ok(p))),
                        Done::Trim(r) => drop(r.send(Ok(()))),
                    }
                }
                if let Some(sink) = self.sink.get().and_then(Weak::upgrade) {
                    for (doc, epoch, entries) in delivered {
                        sink.deliver(&doc, epoch, entries);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded log commit failed; nothing in this group was acknowledged");
                let msg = e.to_string();
                for d in done {
                    let err = || BackplaneError::Storage(msg.clone());
                    match d {
                        Done::Open(r, _) => drop(r.send(Err(err()))),
                        Done::Append(r, _) => drop(r.send(Err(err()))),
                        Done::Trim(r) => drop(r.send(Err(err()))),
                    }
                }
            }
        }
    }

    fn write(
        &self,
        group: Vec<WriteOp>,
        done: &mut Vec<Done>,
        delivered: &mut Vec<(DocId, u64, Vec<Entry>)>,
    ) -> Result<(), BackplaneError> {
        // Replies are collected even if the write fails half way, so every caller hears back.
        let mut pending_err: Option<BackplaneError> = None;
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut log = txn.open_table(LOG).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut heads: HashMap<DocId, LogHead> = HashMap::new();
            let now = now_ms();
            for op in group {
                let doc = match &op {
                    WriteOp::Open { doc, .. }
                    | WriteOp::Append { doc, .. }
                    | WriteOp::Trim { doc, .. } => doc.clone(),
                };
                let head = match heads.get(&doc) {
                    Some(h) => Ok(*h),
                    None => meta.get(doc.as_str()).map_err(storage).map(|v| {
                        v.map(|v| head_from(v.value())).unwrap_or(LogHead {
                            epoch: new_epoch(),
                            last: StreamId::ZERO,
                            floor: StreamId::ZERO,
                        })
                    }),
                };
                let mut head = match head {
                    Ok(h) => h,
                    Err(e) => {
                        pending_err.get_or_insert(e);
                        push_failed(op, done);
                        continue;
                    }
                };
                let outcome = match op {
                    WriteOp::Open { reply, .. } => {
                        done.push(Done::Open(reply, head));
                        Ok(())
                    }
                    WriteOp::Append {
                        update,
                        origin,
                        reply,
                        ..
                    } => {
                        let id = next_id(head.last, now);
                        let value = encode_value(origin, &update);
                        match log.insert((doc.as_str(), id.ms, id.seq), &value[..]) {
                            Ok(_) => {
                                head.last = id;
                                done.push(Done::Append(reply, Position::new(head.epoch, id)));
                                let entry = Entry { id, update, origin };
                                match delivered.last_mut() {
                                    Some((d, _, entries)) if *d == doc => entries.push(entry),
                                    _ => delivered.push((doc.clone(), head.epoch, vec![entry])),
                                }
                                Ok(())
                            }
                            Err(e) => {
                                done.push(Done::Append(reply, Position::new(head.epoch, id)));
                                Err(storage(e))
                            }
                        }
                    }
                    WriteOp::Trim { before, reply, .. } => {
                        done.push(Done::Trim(reply));
                        trim(&mut log, &doc, before).map(|last_removed| {
                            if let Some(id) = last_removed {
                                head.floor = head.floor.max(id);
                            }
                        })
                    }
                };
                if let Err(e) = outcome {
                    pending_err.get_or_insert(e);
                }
                heads.insert(doc, head);
            }
            for (doc, head) in &heads {
                if let Err(e) = meta.insert(doc.as_str(), head_to(head)) {
                    pending_err.get_or_insert(storage(e));
                }
            }
        }
        if let Some(e) = pending_err {
            // Abort: nothing of this group becomes visible, and nobody gets an ack.
            drop(txn);
            return Err(e);
        }
        txn.commit().map_err(storage)
    }
}

fn push_failed(op: WriteOp, done: &mut Vec<Done>) {
    match op {
        WriteOp::Open { reply, .. } => done.push(Done::Open(
            reply,
            LogHead {
                epoch: 0,
                last: StreamId::ZERO,
                floor: StreamId::ZERO,
            },
        )),
        WriteOp::Append { reply, .. } => {
            done.push(Done::Append(reply, Position::new(0, StreamId::ZERO)))
        }
        WriteOp::Trim { reply, .. } => done.push(Done::Trim(reply)),
    }
}

/// Removes entries below `before`; returns the id of the newest one removed.
fn trim(
    log: &mut redb::Table<'_, (&'static str, u64, u64), &'static [u8]>,
    doc: &DocId,
    before: StreamId,
) -> BackplaneResult<Option<StreamId>> {
    let mut ids = Vec::new();
    for row in log
        .range((doc.as_str(), 0u64, 0u64)..(doc.as_str(), before.ms, before.seq))
        .map_err(storage)?
    {
        let (k, _) = row.map_err(storage)?;
        let (_, ms, seq) = k.value();
        ids.push(StreamId::new(ms, seq));
    }
    for id in &ids {
        log.remove((doc.as_str(), id.ms, id.seq)).map_err(storage)?;
    }
    Ok(ids.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Mutex<Vec<(String, Vec<StreamId>)>>);
    impl EntrySink for Collect {
        fn deliver(&self, doc: &DocId, _epoch: u64, entries: Vec<Entry>) {
            lock(&self.0).push((doc.to_string(), entries.iter().map(|e| e.id).collect()));
        }
    }

    #[tokio::test]
    async fn append_read_trim_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let epoch;
        let mut ids = Vec::new();
        {
            let bp = EmbeddedBackplane::open(&path, 1 << 20, &tracker).expect("open");
            let collect = Arc::new(Collect(Mutex::new(Vec::new())));
            let sink: Arc<dyn EntrySink> = collect.clone();
            bp.attach(Arc::downgrade(&sink));
            let head = bp.open(&doc).await.expect("open doc");
            epoch = head.epoch;
            assert_eq!(head.last, StreamId::ZERO);
            for i in 0..5u8 {
                let origin = Origin {
                    node: 1,
                    conn: 2,
                    seq: Some(u64::from(i)),
                };
                let p = bp
                    .append(&doc, Bytes::from(vec![i]), Some(origin))
                    .await
                    .expect("append");
                assert_eq!(p.epoch, epoch);
                ids.push(p.id);
            }
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            let (head, entries) = bp.read_after(&doc, ids[1]).await.expect("read");
            assert_eq!(head.last, ids[4]);
            assert_eq!(
                entries.iter().map(|e| e.id).collect::<Vec<_>>(),
                ids[2..].to_vec()
            );
            assert_eq!(entries[0].update.as_ref(), &[2]);
            assert_eq!(entries[0].origin.and_then(|o| o.seq), Some(2));
            bp.trim(&doc, ids[2]).await.expect("trim");
            let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
            assert_eq!(head.floor, ids[1]);
            assert_eq!(entries.len(), 3);
            assert!(head.can_replay_after(Position::new(epoch, ids[1])));
            assert!(!head.can_replay_after(Position::new(epoch, ids[0])));
            assert!(!head.can_replay_after(Position::new(epoch + 1, ids[3])));
            assert!(!head.can_replay_after(Position::new(epoch, ids[4].successor())));
            bp.close().await;
            let delivered: usize = lock(&collect.0).iter().map(|(_, v)| v.len()).sum();
            assert_eq!(delivered, 5);
        }
        let bp = EmbeddedBackplane::open(&path, 1 << 20, &tracker).expect("reopen");
        let head = bp.open(&doc).await.expect("open doc");
        assert_eq!(head.epoch, epoch, "epoch survives a restart");
        assert_eq!(head.last, ids[4]);
        let next = bp
            .append(&doc, Bytes::from_static(b"x"), None)
            .await
            .expect("append");
        assert!(next.id > ids[4]);
        bp.close().await;
    }
}
