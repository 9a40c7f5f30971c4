//! The embedded backplane: each document's log, acknowledged once its group is fsynced in a write-ahead file, kept in one local redb file.
//!
//! Why redb and not only a hand-rolled append file: we need per-document range reads (replay
//! after a position), range deletes (trim after a snapshot), a small metadata row per document
//! (epoch, last id, trim floor) and crash safety — redb gives all four with copy-on-write pages
//! and a checksummed commit. Plain files would need our own index and compaction.
//!
//! Why a write-ahead file in front of it: a redb commit per group costs its B-tree page writes,
//! checksums and an fsync of every page it touched — over half of a node's CPU per update when
//! the log is not busy enough to group many. Here one writer thread takes every append waiting
//! at that moment, writes them as records to the current segment with one `write` and one
//! `fdatasync` (`wal.rs`), and only then answers the appenders and hands the entries to the
//! sink. The entries wait in memory (`Pending`, where reads find them) until a checkpoint
//! thread writes a whole segment's worth to redb in one transaction, about once a second, and
//! deletes the segment. At open, segments left by a crash are replayed into redb first.

use super::wal::{self, Record, Segment};
use super::{
    Backplane, BackplaneError, BackplaneResult, Entry, EntrySink, LogHead, Origin, answer,
    new_epoch, next_id, now_ms,
};
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

/// (doc, ms, seq) → origin header + update bytes.
const LOG: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("log");
/// doc → (epoch, last ms, last seq, floor ms, floor seq).
const META: TableDefinition<&str, (u64, u64, u64, u64, u64)> = TableDefinition::new("meta");
/// "id" → the id every write-ahead segment of this database carries.
const WAL_ID: TableDefinition<&str, u64> = TableDefinition::new("wal");

/// Appends admitted but not yet written. Past this, `append` answers `Overloaded` at once
/// rather than queueing without bound.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Most operations written in one group (one fsync).
const MAX_GROUP: usize = 2048;

const ORIGIN_HEADER: usize = 25;

/// A segment is checkpointed into redb once it holds this much…
const CHECKPOINT_BYTES: u64 = 16 << 20;
/// …or once its first record is this old.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// How soon the checkpoint thread tries again after it could not start a new segment (a full
/// disk, say): later, not in a loop.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);
/// Bytes of acknowledged entries waiting for redb past which the writer waits for a
/// checkpoint, and refuses appends if redb still cannot take them.
const MAX_PENDING_BYTES: usize = 256 << 20;
/// What an entry costs in the pending set beyond its update bytes.
const ENTRY_OVERHEAD: usize = 96;

enum WriteOp {
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

impl WriteOp {
    fn doc(&self) -> &DocId {
        match self {
            WriteOp::Append { doc, .. } | WriteOp::Trim { doc, .. } => doc,
        }
    }
}

/// Acknowledged changes that redb does not hold yet, by document.
#[derive(Default)]
struct Pending {
    docs: HashMap<DocId, PendingDoc>,
    /// Update bytes (plus overhead) of every entry in `docs`.
    bytes: usize,
}

struct PendingDoc {
    /// The document's head as its newest change left it: authoritative over redb's row.
    head: LogHead,
    /// The segment that holds the newest change to `head`.
    head_seg: u64,
    /// Oldest first, each with the segment that holds it.
    entries: VecDeque<(u64, Entry)>,
    /// Trims redb has not applied yet, with their segments.
    trims: Vec<(u64, StreamId)>,
}

/// What the writer, the checkpoint thread and readers share.
struct Shared {
    db: Database,
    pending: Mutex<Pending>,
    /// The segment being written. Lock order: `active`, then `pending`.
    active: Mutex<Active>,
    /// The write-ahead segments are named after the redb file.
    base: PathBuf,
    /// Written in every segment's header, so segments only ever replay into this database.
    wal_id: u64,
    checkpoint_after: Duration,
}

struct Active {
    /// `None` after a write failed and the segment could not be cut back, or once closed.
    segment: Option<Segment>,
    next_seq: u64,
    /// When the segment got its first record.
    dirty_since: Option<Instant>,
    /// Where the acknowledged bytes of a segment a failed write left junk in end, until a new
    /// segment's header carries it.
    cut: Option<wal::Cut>,
}

impl Active {
    /// Creates the next segment, carrying the pending cut. A number whose creation failed is
    /// not used again (its file may exist, unfinished).
    fn start_segment(&mut self, base: &Path, wal_id: u64) -> std::io::Result<Segment> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let segment = Segment::create(base, seq, wal_id, self.cut)?;
        self.cut = None;
        Ok(segment)
    }
}

impl Shared {
    /// How long until the active segment is due for a checkpoint (`None`: it holds nothing).
    fn checkpoint_due_in(&self) -> Option<Duration> {
        let a = lock(&self.active);
        let since = a.dirty_since?;
        let full = a
            .segment
            .as_ref()
            .is_some_and(|s| s.len >= CHECKPOINT_BYTES);
        Some(if full {
            Duration::ZERO
        } else {
            self.checkpoint_after.saturating_sub(since.elapsed())
        })
    }

    /// Ends the active segment, starting a new one (none when `last`), and returns the
    /// number up to which segments are complete: everything they hold can be checkpointed.
    fn rotate(&self, last: bool) -> Option<u64> {
        let mut a = lock(&self.active);
        let current = a.segment.as_ref().map(|s| s.seq);
        // With no segment (a write failed and it could not be cut back), the newest number
        // handed out is the one that ended.
        let ended = current.unwrap_or(a.next_seq - 1);
        if last {
            a.segment = None;
            a.dirty_since = None;
            return Some(ended);
        }
        if a.dirty_since.is_none() {
            // Nothing new in the active segment: only older ones (left by a checkpoint that
            // failed) have anything for redb.
            return Some(current.map_or(ended, |c| c - 1));
        }
        match a.start_segment(&self.base, self.wal_id) {
            Ok(next) => {
                a.segment = Some(next);
                a.dirty_since = None;
                Some(ended)
            }
            Err(e) => {
                // Keep appending to the current segment; the next due check tries again.
                tracing::error!(error = %e, "could not start a new write-ahead segment");
                None
            }
        }
    }
}

pub struct EmbeddedBackplane {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    sink: Arc<OnceLock<Weak<dyn EntrySink>>>,
    tracker: TaskTracker,
    /// The writer's and the checkpoint thread's ends; `close` waits for both, after which
    /// the database file is free to open again.
    threads_done: Mutex<Vec<oneshot::Receiver<()>>>,
}

fn storage<E: std::fmt::Display>(e: E) -> BackplaneError {
    BackplaneError::Storage(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmbeddedBackplane {
    /// Opens (or creates) `path`, replays any write-ahead segments a crash left beside it,
    /// and starts the writer and the checkpoint thread on `tracker`. `cache_bytes` bounds
    /// redb's page cache (its default, 1 GiB, would let the log's recent pages grow the
    /// process by as much as was written); hot documents keep their own recent entries, so
    /// the cache mostly serves loads and catch-ups.
    pub fn open(path: &Path, cache_bytes: usize, tracker: &TaskTracker) -> BackplaneResult<Self> {
        Self::open_with(path, cache_bytes, tracker, CHECKPOINT_AFTER)
    }

    /// [`open`](Self::open) with the age at which a segment is checkpointed.
    fn open_with(
        path: &Path,
        cache_bytes: usize,
        tracker: &TaskTracker,
        checkpoint_after: Duration,
    ) -> BackplaneResult<Self> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(storage)?;
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(storage)?;
        let wal_id = {
            txn.open_table(LOG).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            let mut ids = txn.open_table(WAL_ID).map_err(storage)?;
            let existing = ids.get("id").map_err(storage)?.map(|v| v.value());
            match existing {
                Some(id) => id,
                None => {
                    let id = rand::random::<u64>() | 1;
                    ids.insert("id", id).map_err(storage)?;
                    id
                }
            }
        };
        txn.commit().map_err(storage)?;

        let last_seq = replay(&db, path, wal_id)?;
        let segment = Segment::create(path, last_seq + 1, wal_id, None).map_err(storage)?;

        let shared = Arc::new(Shared {
            db,
            pending: Mutex::new(Pending::default()),
            active: Mutex::new(Active {
                segment: Some(segment),
                next_seq: last_seq + 2,
                dirty_since: None,
                cut: None,
            }),
            base: path.to_path_buf(),
            wal_id,
            checkpoint_after,
        });
        let checkpoints = Arc::new(Checkpoints::default());
        let (checkpoints_done, checkpoints_done_rx) = oneshot::channel();
        {
            let shared = shared.clone();
            let checkpoints = checkpoints.clone();
            tracker.spawn_blocking(move || {
                checkpoints.serve(&shared);
                drop(shared);
                let _ = checkpoints_done.send(());
            });
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let sink: Arc<OnceLock<Weak<dyn EntrySink>>> = Arc::new(OnceLock::new());
        let (done_tx, done_rx) = oneshot::channel();
        let writer = Writer {
            shared: shared.clone(),
            sink: sink.clone(),
            checkpoints,
        };
        tracker.spawn_blocking(move || {
            writer.run(rx);
            let _ = done_tx.send(());
        });
        Ok(EmbeddedBackplane {
            shared,
            tx: Mutex::new(Some(tx)),
            sink,
            tracker: tracker.clone(),
            threads_done: Mutex::new(vec![done_rx, checkpoints_done_rx]),
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
        let shared = self.shared.clone();
        let doc = doc.clone();
        let task = self
            .tracker
            .spawn_blocking(move || read_after(&shared, &doc, after));
        async move { task.await.map_err(storage)? }.boxed()
    }

    /// Every append is delivered by this process, so the head is exact: an id past it cannot
    /// exist yet (whatever the clock says; ids here never go backwards, even when it does).
    fn may_hold(&self, doc: &DocId, id: StreamId) -> BoxFuture<'static, bool> {
        let shared = self.shared.clone();
        let doc = doc.clone();
        let task = self.tracker.spawn_blocking(move || {
            let head = {
                let p = lock(&shared.pending);
                match p.docs.get(&doc) {
                    Some(d) => Some(d.head),
                    None => shared
                        .db
                        .begin_read()
                        .ok()
                        .and_then(|txn| head_in(&txn, &doc).ok().flatten()),
                }
            };
            head.is_some_and(|h| id <= h.last)
        });
        async move { task.await.unwrap_or(false) }.boxed()
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
        // Dropping the sender lets the writer finish what was admitted, checkpoint, then stop.
        lock(&self.tx).take();
        let done = std::mem::take(&mut *lock(&self.threads_done));
        async move {
            for done in done {
                let _ = done.await;
            }
        }
        .boxed()
    }
}

const NO_LOG: LogHead = LogHead::NONE;

fn read_after(
    shared: &Shared,
    doc: &DocId,
    after: StreamId,
) -> BackplaneResult<(LogHead, Vec<Entry>)> {
    // redb's snapshot is taken while the pending set is held. A checkpoint removes entries
    // from the set only after redb committed them, so every entry is in one of the two (or
    // both, for a moment: the pending copy is then skipped below).
    let (pending, txn) = {
        let p = lock(&shared.pending);
        let pending = p.docs.get(doc).map(|d| {
            let newer: Vec<Entry> = d
                .entries
                .iter()
                .filter(|(_, e)| e.id > after)
                .map(|(_, e)| e.clone())
                .collect();
            (d.head, newer)
        });
        (pending, shared.db.begin_read().map_err(storage)?)
    };
    let head = match &pending {
        Some((h, _)) => *h,
        None => head_in(&txn, doc)?.unwrap_or(NO_LOG),
    };
    let log = txn.open_table(LOG).map_err(storage)?;
    // Entries at or below the floor are gone, even while redb still holds them (a trim that
    // waits for its checkpoint).
    let from = after.max(head.floor).successor();
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
    if let Some((_, newer)) = pending {
        let stored_last = entries.last().map(|e| e.id);
        entries.extend(
            newer
                .into_iter()
                .filter(|e| stored_last.is_none_or(|last| e.id > last)),
        );
    }
    Ok((head, entries))
}

/// The head redb holds for `doc` in `txn`'s snapshot.
fn head_in(txn: &redb::ReadTransaction, doc: &DocId) -> BackplaneResult<Option<LogHead>> {
    let meta = txn.open_table(META).map_err(storage)?;
    Ok(meta
        .get(doc.as_str())
        .map_err(storage)?
        .map(|v| head_from(v.value())))
}

/// The newest entry id below `before` that redb holds for `doc`.
fn stored_newest_below(
    db: &Database,
    doc: &DocId,
    before: StreamId,
) -> BackplaneResult<Option<StreamId>> {
    let txn = db.begin_read().map_err(storage)?;
    let log = txn.open_table(LOG).map_err(storage)?;
    let newest = log
        .range((doc.as_str(), 0u64, 0u64)..(doc.as_str(), before.ms, before.seq))
        .map_err(storage)?
        .next_back()
        .transpose()
        .map_err(storage)?
        .map(|(k, _)| {
            let (_, ms, seq) = k.value();
            StreamId::new(ms, seq)
        });
    Ok(newest)
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

/// A replayed or checkpointed head never moves a log backwards: within one epoch the last id
/// and the floor only grow. A different epoch is a new log and replaces the row.
fn merge_head(stored: Option<LogHead>, newer: LogHead) -> LogHead {
    match stored {
        Some(s) if s.epoch == newer.epoch => LogHead {
            epoch: s.epoch,
            last: s.last.max(newer.last),
            floor: s.floor.max(newer.floor),
        },
        _ => newer,
    }
}

/// Applies the segments a previous run left beside `base` to redb in one transaction, then
/// deletes them. Returns the highest segment number seen (0 if none). Fails, leaving every
/// segment in place, if one is damaged where it held acknowledged entries
/// ([`wal::plan_replay`]).
fn replay(db: &Database, base: &Path, wal_id: u64) -> BackplaneResult<u64> {
    let segments = wal::plan_replay(base, wal_id)?;
    let Some(last_seq) = segments.last().map(|s| s.seq) else {
        return Ok(0);
    };
    let started = Instant::now();
    let mut applied = 0usize;
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut log = txn.open_table(LOG).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut heads: HashMap<DocId, LogHead> = HashMap::new();
        for segment in &segments {
            match &segment.what {
                wal::Holds::Nothing(wal::Skipped::OtherDatabase) => {
                    tracing::warn!(segment = %segment.path.display(), "skipping a write-ahead segment written for another log file");
                }
                wal::Holds::Nothing(wal::Skipped::UnfinishedHeader) => {}
                wal::Holds::Records { torn_bytes, .. } if *torn_bytes > 0 => {
                    tracing::warn!(
                        segment = segment.seq,
                        torn_bytes,
                        "a write-ahead segment ends in a group a crash cut short; it was never acknowledged"
                    );
                }
                wal::Holds::Records { .. } => {}
            }
            for record in wal::read_planned(segment)? {
                replay_record(&mut log, &mut meta, &mut heads, record)?;
                applied += 1;
            }
        }
        for (doc, head) in &heads {
            meta.insert(doc.as_str(), head_to(head)).map_err(storage)?;
            // An older segment's appends may have come back after a newer trim removed them.
            if head.floor > StreamId::ZERO {
                trim(&mut log, doc, head.floor.successor())?;
            }
        }
    }
    txn.commit().map_err(storage)?;
    for segment in &segments {
        std::fs::remove_file(&segment.path).map_err(storage)?;
    }
    wal::sync_dir(base).map_err(storage)?;
    tracing::info!(
        segments = segments.len(),
        records = applied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replayed the embedded log's write-ahead segments"
    );
    Ok(last_seq)
}

/// Applies one replayed record to the log table, tracking each document's head in `heads`.
fn replay_record(
    log: &mut redb::Table<'_, (&'static str, u64, u64), &'static [u8]>,
    meta: &mut redb::Table<'_, &'static str, (u64, u64, u64, u64, u64)>,
    heads: &mut HashMap<DocId, LogHead>,
    record: Record,
) -> BackplaneResult<()> {
    let doc = record.doc().clone();
    let stored = match heads.get(&doc) {
        Some(h) => Some(*h),
        None => meta
            .get(doc.as_str())
            .map_err(storage)?
            .map(|v| head_from(v.value())),
    };
    let head = merge_head(stored, record.head());
    match &record {
        Record::Append {
            head: at, value, ..
        } => {
            log.insert((doc.as_str(), at.last.ms, at.last.seq), &value[..])
                .map_err(storage)?;
        }
        Record::Trim { before, .. } => {
            trim(log, &doc, *before)?;
        }
        Record::Head { .. } => {}
    }
    heads.insert(doc, head);
    Ok(())
}

/// How long a group waits for more appends when the log is busy.
const COMMIT_DELAY: Duration = Duration::from_millis(2);
/// The log counts as busy when the previous group ended less than this ago.
const BUSY_WITHIN: Duration = Duration::from_millis(5);

fn take_waiting(rx: &mut mpsc::Receiver<WriteOp>, group: &mut Vec<WriteOp>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(op) => group.push(op),
            Err(_) => break,
        }
    }
}

/// The checkpoint thread's mailbox. The thread decides when a segment is due (its age, or
/// its size as the writer reports it), ends it, and writes what it held into redb; the
/// writer never waits for redb.
#[derive(Default)]
struct Checkpoints {
    state: Mutex<CheckpointState>,
    changed: Condvar,
}

#[derive(Default)]
struct CheckpointState {
    /// Checkpoint now, due or not (the pending set is too large).
    force: bool,
    /// The writer has stopped: checkpoint everything, then end.
    closed: bool,
    /// Checkpoints finished (either way), so a waiter can tell one has run since it asked.
    finished: u64,
}

impl Checkpoints {
    /// The writer wrote a segment's first record, or filled it: look at it again. Taking
    /// the lock means the thread is either before its look or already waiting, never in
    /// between (where the wake-up would be lost).
    fn nudge(&self) {
        let _s = lock(&self.state);
        self.changed.notify_all();
    }

    /// Has a checkpoint run now and waits until it finished.
    fn force_and_wait(&self) {
        let mut s = lock(&self.state);
        let seen = s.finished;
        s.force = true;
        self.changed.notify_all();
        while s.finished == seen && !s.closed {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// The checkpoint thread: until closed, checkpoints each segment when it is due.
    fn serve(&self, shared: &Shared) {
        let mut s = lock(&self.state);
        loop {
            let last = s.closed;
            if !last && !std::mem::take(&mut s.force) {
                match shared.checkpoint_due_in() {
                    Some(wait) if wait.is_zero() => {}
                    Some(wait) => {
                        s = self
                            .changed
                            .wait_timeout(s, wait)
                            .map(|(s, _)| s)
                            .unwrap_or_else(|poisoned| poisoned.into_inner().0);
                        continue;
                    }
                    None => {
                        s = self
                            .changed
                            .wait(s)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        continue;
                    }
                }
            }
            drop(s);
            let rotated = shared.rotate(last);
            if let Some(upto) = rotated {
                run_checkpoint(shared, upto);
            }
            s = lock(&self.state);
            s.finished += 1;
            self.changed.notify_all();
            if last {
                return;
            }
            if rotated.is_none() {
                s = self
                    .changed
                    .wait_timeout(s, CHECKPOINT_RETRY)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
        }
    }
}

fn run_checkpoint(shared: &Shared, upto: u64) {
    let started = Instant::now();
    match checkpoint(shared, upto) {
        // Nothing was waiting (a close right after an idle spell): not a checkpoint to count.
        Ok(None) => {}
        Ok(Some(entries)) => {
            metrics::counter!(crate::metrics::names::LOG_CHECKPOINTS, "outcome" => "ok")
                .increment(1);
            crate::metrics::observe(
                crate::metrics::names::LOG_CHECKPOINT_SECONDS,
                started.elapsed(),
            );
            tracing::debug!(upto, entries, "checkpointed the write-ahead log into redb");
        }
        Err(e) => {
            metrics::counter!(crate::metrics::names::LOG_CHECKPOINTS, "outcome" => "failed")
                .increment(1);
            // Nothing is lost: the segments stay and their entries stay pending; the next
            // checkpoint covers them again.
            tracing::error!(error = %e, upto, "checkpoint of the write-ahead log into redb failed; will retry");
        }
    }
}

/// Writes everything segments `..=upto` hold into redb in one transaction, then forgets it
/// from the pending set and deletes those segments. Returns how many entries it wrote, `None`
/// if nothing was waiting.
fn checkpoint(shared: &Shared, upto: u64) -> BackplaneResult<Option<usize>> {
    struct Copy {
        doc: DocId,
        head: LogHead,
        entries: Vec<Entry>,
        trims: Vec<StreamId>,
    }
    let copies: Vec<Copy> = {
        let p = lock(&shared.pending);
        p.docs
            .iter()
            .filter(|(_, d)| {
                d.head_seg <= upto
                    || d.entries.front().is_some_and(|(seg, _)| *seg <= upto)
                    || d.trims.iter().any(|(seg, _)| *seg <= upto)
            })
            .map(|(doc, d)| Copy {
                doc: doc.clone(),
                // The newest head, even if a later segment changed it: that segment stays
                // until the next checkpoint, and replay never moves a head backwards.
                head: d.head,
                entries: d
                    .entries
                    .iter()
                    .take_while(|(seg, _)| *seg <= upto)
                    .map(|(_, e)| e.clone())
                    .collect(),
                trims: d
                    .trims
                    .iter()
                    .filter(|(seg, _)| *seg <= upto)
                    .map(|(_, before)| *before)
                    .collect(),
            })
            .collect()
    };
    if copies.is_empty() {
        remove_segments(&shared.base, upto)?;
        return Ok(None);
    }
    let mut written = 0;
    let txn = shared.db.begin_write().map_err(storage)?;
    {
        let mut log = txn.open_table(LOG).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        for c in &copies {
            // A pending entry is never older than a trim recorded before it (trims cut below
            // the head), so trims first, then inserts, is the order they happened in.
            for before in &c.trims {
                trim(&mut log, &c.doc, *before)?;
            }
            for e in &c.entries {
                let value = encode_value(e.origin, &e.update);
                log.insert((c.doc.as_str(), e.id.ms, e.id.seq), &value[..])
                    .map_err(storage)?;
                written += 1;
            }
            meta.insert(c.doc.as_str(), head_to(&c.head))
                .map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)?;
    {
        let mut p = lock(&shared.pending);
        let mut freed = 0;
        for c in &copies {
            let Some(d) = p.docs.get_mut(&c.doc) else {
                continue;
            };
            while d.entries.front().is_some_and(|(seg, _)| *seg <= upto) {
                if let Some((_, e)) = d.entries.pop_front() {
                    freed += e.update.len() + ENTRY_OVERHEAD;
                }
            }
            d.trims.retain(|(seg, _)| *seg > upto);
            if d.entries.is_empty() && d.trims.is_empty() && d.head_seg <= upto {
                p.docs.remove(&c.doc);
            }
        }
        p.bytes = p.bytes.saturating_sub(freed);
    }
    remove_segments(&shared.base, upto)?;
    Ok(Some(written))
}

fn remove_segments(base: &Path, upto: u64) -> BackplaneResult<()> {
    for (seq, path) in wal::list_segments(base).map_err(storage)? {
        if seq <= upto {
            std::fs::remove_file(path).map_err(storage)?;
        }
    }
    Ok(())
}

struct Writer {
    shared: Arc<Shared>,
    sink: Arc<OnceLock<Weak<dyn EntrySink>>>,
    checkpoints: Arc<Checkpoints>,
}

/// What a written group hands out once the fsync returned.
enum Done {
    Append(oneshot::Sender<BackplaneResult<Position>>, Position),
    Trim(oneshot::Sender<BackplaneResult<()>>),
}

/// What a written group changes in the pending set.
enum Change {
    Append(DocId, LogHead, Entry),
    Trim(DocId, LogHead, StreamId),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut last_write: Option<Instant> = None;
        while let Some(first) = rx.blocking_recv() {
            let mut group = Vec::with_capacity(64);
            group.push(first);
            take_waiting(&mut rx, &mut group);
            // Under sustained load (the last group just ended), wait a moment for more
            // appends so that one write and one fsync cover them all. A lone writer (the
            // log was quiet) goes at once.
            if group.len() < MAX_GROUP && last_write.is_some_and(|t| t.elapsed() < BUSY_WITHIN) {
                std::thread::sleep(COMMIT_DELAY);
                take_waiting(&mut rx, &mut group);
            }
            self.commit_group(group);
            last_write = Some(Instant::now());
        }
        // Closing: the checkpoint thread hands everything to redb and removes every
        // segment, so the next start has nothing to replay.
        self.checkpoints.close();
    }

    fn commit_group(&mut self, group: Vec<WriteOp>) {
        let mut done = Vec::with_capacity(group.len());
        let mut delivered: Vec<(DocId, u64, Vec<Entry>)> = Vec::new();
        let result = self.write(group, &mut done, &mut delivered);
        match result {
            Ok(()) => {
                for d in done {
                    match d {
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
                tracing::error!(error = %e, "embedded log write failed; nothing in this group was acknowledged");
                let msg = e.to_string();
                for d in done {
                    let err = || BackplaneError::Storage(msg.clone());
                    match d {
                        Done::Append(r, _) => drop(r.send(Err(err()))),
                        Done::Trim(r) => drop(r.send(Err(err()))),
                    }
                }
            }
        }
    }

    /// The head `doc` has now: the pending set's, else redb's (`None`: no log yet).
    fn head_of(&self, doc: &DocId) -> BackplaneResult<Option<LogHead>> {
        let p = lock(&self.shared.pending);
        match p.docs.get(doc) {
            Some(d) => Ok(Some(d.head)),
            // The snapshot is taken while `pending` is held, so a checkpoint cannot slip
            // between the look at the pending set and this read.
            None => head_in(&self.shared.db.begin_read().map_err(storage)?, doc),
        }
    }

    /// The newest entry below `before` that `doc` holds anywhere: in this group, pending, or
    /// in redb.
    fn newest_below(
        &self,
        doc: &DocId,
        before: StreamId,
        changes: &[Change],
    ) -> BackplaneResult<Option<StreamId>> {
        let in_group = changes
            .iter()
            .filter_map(|c| match c {
                Change::Append(d, _, e) if d == doc && e.id < before => Some(e.id),
                _ => None,
            })
            .max();
        let p = lock(&self.shared.pending);
        let pending = p.docs.get(doc).and_then(|d| {
            d.entries
                .iter()
                .map(|(_, e)| e.id)
                .take_while(|id| *id < before)
                .last()
        });
        let stored = stored_newest_below(&self.shared.db, doc, before)?;
        Ok(in_group.max(pending).max(stored))
    }

    fn write(
        &mut self,
        group: Vec<WriteOp>,
        done: &mut Vec<Done>,
        delivered: &mut Vec<(DocId, u64, Vec<Entry>)>,
    ) -> Result<(), BackplaneError> {
        // Past the memory bound, give redb a chance to catch up before taking more.
        if lock(&self.shared.pending).bytes > MAX_PENDING_BYTES {
            self.checkpoints.force_and_wait();
        }
        let behind = lock(&self.shared.pending).bytes > MAX_PENDING_BYTES;
        // Replies are collected even if the write fails half way, so every caller hears back.
        let mut pending_err: Option<BackplaneError> =
            behind.then(|| BackplaneError::Storage("the log's database is not keeping up".into()));
        let mut heads: HashMap<DocId, Option<LogHead>> = HashMap::new();
        let mut changes: Vec<Change> = Vec::with_capacity(group.len());
        let mut records = wal::Group::default();
        let now = now_ms();
        for op in group {
            let doc = op.doc().clone();
            let head = match heads.get(&doc) {
                Some(h) => Ok(*h),
                None => self.head_of(&doc),
            };
            let head = match head {
                Ok(h) if pending_err.is_none() => h,
                Ok(_) => {
                    push_failed(op, done);
                    continue;
                }
                Err(e) => {
                    pending_err.get_or_insert(e);
                    push_failed(op, done);
                    continue;
                }
            };
            // A log comes into being with its first append, never with a read (a reader of a
            // document nobody wrote stores nothing): its epoch is born here.
            let fresh = || LogHead {
                epoch: new_epoch(),
                last: StreamId::ZERO,
                floor: StreamId::ZERO,
            };
            match op {
                WriteOp::Append {
                    update,
                    origin,
                    reply,
                    ..
                } => {
                    let mut head = head.unwrap_or_else(fresh);
                    let id = next_id(head.last, now);
                    head.last = id;
                    records.push(&Record::Append {
                        doc: doc.clone(),
                        head,
                        value: encode_value(origin, &update).freeze(),
                    });
                    done.push(Done::Append(reply, Position::new(head.epoch, id)));
                    let entry = Entry { id, update, origin };
                    match delivered.last_mut() {
                        Some((d, _, entries)) if *d == doc => entries.push(entry.clone()),
                        _ => delivered.push((doc.clone(), head.epoch, vec![entry.clone()])),
                    }
                    changes.push(Change::Append(doc.clone(), head, entry));
                    heads.insert(doc, Some(head));
                }
                WriteOp::Trim { before, reply, .. } => {
                    done.push(Done::Trim(reply));
                    // No log, nothing to trim.
                    let Some(mut head) = head else { continue };
                    match self.newest_below(&doc, before, &changes) {
                        Ok(newest) => {
                            if let Some(id) = newest {
                                head.floor = head.floor.max(id);
                            }
                            records.push(&Record::Trim {
                                doc: doc.clone(),
                                head,
                                before,
                            });
                            changes.push(Change::Trim(doc.clone(), head, before));
                            heads.insert(doc, Some(head));
                        }
                        Err(e) => {
                            pending_err.get_or_insert(e);
                        }
                    }
                }
            }
        }
        if let Some(e) = pending_err {
            // Nothing of this group is written, and nobody gets an ack.
            return Err(e);
        }
        // The pending set changes under the same lock as the write: the checkpoint thread
        // cannot end this segment between the two and miss this group's entries.
        let mut nudge = false;
        let mut active = lock(&self.shared.active);
        let a = &mut *active;
        if a.segment.is_none() {
            let next = a.start_segment(&self.shared.base, self.shared.wal_id);
            a.segment = Some(next.map_err(storage)?);
        }
        let Some(segment) = a.segment.as_mut() else {
            return Err(BackplaneError::Storage("no write-ahead segment".into()));
        };
        if !records.is_empty() {
            if let Err(e) = segment.append(&mut records) {
                if e.poisoned.is_some() {
                    a.segment = None;
                    a.cut = e.poisoned;
                }
                return Err(storage(e.error));
            }
            nudge = a.dirty_since.is_none() || segment.len >= CHECKPOINT_BYTES;
            a.dirty_since.get_or_insert_with(Instant::now);
        }
        let seg = segment.seq;
        let mut pending = lock(&self.shared.pending);
        let p = &mut *pending;
        for change in changes {
            let (doc, head) = match &change {
                Change::Append(d, h, _) | Change::Trim(d, h, _) => (d.clone(), *h),
            };
            let d = p.docs.entry(doc).or_insert_with(|| PendingDoc {
                head,
                head_seg: seg,
                entries: VecDeque::new(),
                trims: Vec::new(),
            });
            d.head = head;
            d.head_seg = seg;
            match change {
                Change::Append(_, _, entry) => {
                    p.bytes += entry.update.len() + ENTRY_OVERHEAD;
                    d.entries.push_back((seg, entry));
                }
                Change::Trim(_, _, before) => {
                    while d.entries.front().is_some_and(|(_, e)| e.id < before) {
                        if let Some((_, e)) = d.entries.pop_front() {
                            p.bytes = p.bytes.saturating_sub(e.update.len() + ENTRY_OVERHEAD);
                        }
                    }
                    d.trims.push((seg, before));
                }
            }
        }
        drop(pending);
        drop(active);
        if nudge {
            self.checkpoints.nudge();
        }
        Ok(())
    }
}

fn push_failed(op: WriteOp, done: &mut Vec<Done>) {
    match op {
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
            let (head, none) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
            assert_eq!(
                (head, none.len()),
                (NO_LOG, 0),
                "no log before the first append"
            );
            let mut first = None;
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
                assert_eq!(*first.get_or_insert(p.epoch), p.epoch);
                ids.push(p.id);
            }
            epoch = first.unwrap_or_default();
            assert_ne!(epoch, 0);
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
        let (head, _) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(head.epoch, epoch, "epoch survives a restart");
        assert_eq!(head.last, ids[4]);
        let next = bp
            .append(&doc, Bytes::from_static(b"x"), None)
            .await
            .expect("append");
        assert!(next.id > ids[4]);
        bp.close().await;
    }

    fn entry_ids(entries: &[Entry]) -> Vec<StreamId> {
        entries.iter().map(|e| e.id).collect()
    }

    async fn append_n(bp: &EmbeddedBackplane, doc: &DocId, n: u8) -> Vec<StreamId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let p = bp
                .append(doc, Bytes::from(vec![i; 3]), None)
                .await
                .expect("append");
            ids.push(p.id);
        }
        ids
    }

    /// Copies the log and its write-ahead segments as they are on disk right now: what a
    /// `kill -9` (or a power cut, everything acknowledged having been fsynced) leaves.
    fn crash_image(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }

    #[tokio::test]
    async fn pending_entries_and_trims_read_and_replay_like_checkpointed_ones() {
        const NEVER: Duration = Duration::from_secs(3600);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let other = DocId::parse("other").expect("doc id");

        // Older entries reach redb at close.
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("open");
        let older = append_n(&bp, &doc, 4).await;
        let epoch = bp
            .read_after(&doc, StreamId::ZERO)
            .await
            .expect("read")
            .0
            .epoch;
        bp.close().await;
        drop(bp);
        assert!(
            wal::list_segments(&path).expect("list").is_empty(),
            "a clean close leaves nothing to replay"
        );

        // Newer ones wait in the write-ahead segment, and so does a trim of some of both.
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("reopen");
        let newer = append_n(&bp, &doc, 4).await;
        let other_ids = append_n(&bp, &other, 2).await;
        bp.trim(&doc, newer[1]).await.expect("trim");
        assert!(
            !lock(&bp.shared.pending).docs.is_empty(),
            "nothing was checkpointed yet"
        );
        let expect = |head: LogHead, entries: &[Entry]| {
            assert_eq!(head.epoch, epoch);
            assert_eq!(
                head.floor, newer[0],
                "the newest trimmed entry, from the pending ones"
            );
            assert_eq!(head.last, newer[3]);
            assert_eq!(entry_ids(entries), newer[1..].to_vec());
            assert_eq!(entries[0].update.as_ref(), &[1, 1, 1]);
        };
        let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        expect(head, &entries);
        let (_, after) = bp.read_after(&doc, newer[2]).await.expect("read");
        assert_eq!(entry_ids(&after), vec![newer[3]]);
        assert!(older[3] < newer[0]);

        // What a crash leaves now replays to the same log.
        let crashed = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), crashed.path());
        bp.close().await;
        drop(bp);
        let copy = EmbeddedBackplane::open_with(
            &crashed.path().join("log.redb"),
            1 << 20,
            &tracker,
            NEVER,
        )
        .expect("open the crash image");
        assert!(
            wal::list_segments(&crashed.path().join("log.redb"))
                .expect("list")
                .len()
                == 1,
            "replayed segments are gone; only the new, empty one is left"
        );
        let (head, entries) = copy.read_after(&doc, StreamId::ZERO).await.expect("read");
        expect(head, &entries);
        let (other_head, other_entries) =
            copy.read_after(&other, StreamId::ZERO).await.expect("read");
        assert_eq!(entry_ids(&other_entries), other_ids);
        assert_eq!(other_head.last, other_ids[1]);
        let next = copy
            .append(&doc, Bytes::from_static(b"n"), None)
            .await
            .expect("append");
        assert!(next.id > newer[3] && next.epoch == epoch);
        copy.close().await;

        // And the cleanly closed original reads the same from redb alone.
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("reopen");
        let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        expect(head, &entries);
        bp.close().await;
    }

    #[tokio::test]
    async fn replay_cuts_a_torn_tail_and_refuses_a_damaged_middle() {
        const NEVER: Duration = Duration::from_secs(3600);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("open");
        let ids = append_n(&bp, &doc, 3).await;
        let crashed = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), crashed.path());
        bp.close().await;
        let log = crashed.path().join("log.redb");
        let segment = |log: &Path| {
            let all = wal::list_segments(log).expect("list");
            assert_eq!(all.len(), 1);
            all[0].1.clone()
        };
        let starts = wal::group_starts(&segment(&log));
        assert_eq!(starts.len(), 3, "one group per append, each awaited");

        // The crash hit the last group half way: the two before it are all there.
        let torn = tempfile::tempdir().expect("tempdir");
        crash_image(crashed.path(), torn.path());
        let torn_log = torn.path().join("log.redb");
        std::fs::OpenOptions::new()
            .write(true)
            .open(segment(&torn_log))
            .and_then(|f| f.set_len(starts[2] + 10))
            .expect("tear");
        let bp = EmbeddedBackplane::open_with(&torn_log, 1 << 20, &tracker, NEVER).expect("open");
        let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(entry_ids(&entries), ids[..2].to_vec());
        assert_eq!(head.last, ids[1]);
        bp.close().await;

        // A flipped byte in the middle one: the log does not open, and says where.
        let damaged = segment(&log);
        let mut bytes = std::fs::read(&damaged).expect("read");
        bytes[starts[1] as usize + 12] ^= 0x01;
        std::fs::write(&damaged, bytes).expect("write");
        match EmbeddedBackplane::open_with(&log, 1 << 20, &tracker, NEVER) {
            Err(BackplaneError::Wal(wal::WalError::Corrupt { path, offset, .. })) => {
                assert_eq!((path, offset), (damaged.clone(), starts[1]));
            }
            Err(other) => panic!("expected corruption, got {other}"),
            Ok(_) => panic!("a log with a damaged acknowledged entry opened"),
        }
        assert!(damaged.exists(), "nothing is deleted: the operator decides");
    }

    #[test]
    fn the_segment_after_a_poisoned_one_carries_its_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let doc = DocId::parse("d").expect("doc id");
        let head = LogHead {
            epoch: 1,
            last: StreamId::new(1, 0),
            floor: StreamId::ZERO,
        };
        let mut seg = Segment::create(&base, 1, 7, None).expect("create");
        let mut records = wal::Group::default();
        records.push(&Record::Head { doc, head });
        seg.append(&mut records).expect("append");
        // What a write that failed and could not be cut back left behind it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(wal::segment_path(&base, 1))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"half a group"))
            .expect("junk");
        let mut active = Active {
            segment: None,
            next_seq: 2,
            dirty_since: None,
            cut: Some(wal::Cut {
                seq: 1,
                len: seg.len,
            }),
        };
        let next = active.start_segment(&base, 7).expect("next segment");
        assert_eq!((next.seq, active.next_seq, active.cut), (2, 3, None));
        let mut more = wal::Group::default();
        more.push(&Record::Head {
            doc: DocId::parse("e").expect("doc id"),
            head,
        });
        let mut next = next;
        next.append(&mut more).expect("append");
        let planned = wal::plan_replay(&base, 7).expect("the junk is known not to be damage");
        assert_eq!(planned.len(), 2);
    }

    #[tokio::test]
    async fn a_segment_left_beside_a_new_log_file_is_not_replayed_into_it() {
        const NEVER: Duration = Duration::from_secs(3600);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("open");
        append_n(&bp, &doc, 3).await;
        let crashed = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), crashed.path());
        bp.close().await;
        // The operator deletes the log file but not the segment beside it.
        let lost = crashed.path().join("log.redb");
        std::fs::remove_file(&lost).expect("remove");
        let bp = EmbeddedBackplane::open_with(&lost, 1 << 20, &tracker, NEVER).expect("open");
        let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert!(entries.is_empty());
        assert_eq!(head.epoch, 0, "no log: the old one is not resurrected");
        bp.close().await;
    }

    #[tokio::test]
    async fn every_acknowledged_entry_is_readable_while_checkpoints_move_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let bp = Arc::new(
            EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, Duration::from_millis(2))
                .expect("open"),
        );
        let acked = Arc::new(Mutex::new(Vec::<StreamId>::new()));
        let writer = {
            let (bp, acked, doc) = (bp.clone(), acked.clone(), doc.clone());
            tokio::spawn(async move {
                for i in 0..400u32 {
                    let p = bp
                        .append(&doc, Bytes::from(i.to_le_bytes().to_vec()), None)
                        .await
                        .expect("append");
                    lock(&acked).push(p.id);
                }
            })
        };
        let mut reads = 0;
        let mut checkpointed_while_reading = false;
        while !writer.is_finished() || reads == 0 {
            let known = lock(&acked).clone();
            let (_, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
            let ids = entry_ids(&entries);
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "in order, no duplicates"
            );
            assert!(
                ids.len() >= known.len() && ids[..known.len()] == known[..],
                "every entry acknowledged before the read is in it"
            );
            checkpointed_while_reading |= lock(&bp.shared.pending)
                .docs
                .get(&doc)
                .is_none_or(|d| d.entries.len() < ids.len());
            reads += 1;
        }
        writer.await.expect("writer");
        assert!(
            checkpointed_while_reading,
            "checkpoints ran during the reads"
        );
        let (_, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(entry_ids(&entries), *lock(&acked));
        bp.close().await;
    }
}
