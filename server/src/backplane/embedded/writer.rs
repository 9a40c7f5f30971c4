//! Embedded log, write side (data-flow step 4): the append queue and the writer thread that commits each group with one write and one fdatasync.

use super::checkpoint::{CHECKPOINT_BYTES, Checkpoints};
use super::shared::{ENTRY_OVERHEAD, Pending, PendingDoc, Shared, Stored};
use super::store::{head_in, stored_newest_below, value_len};
use super::wal::{self, Record};
use super::{lock, storage};
use crate::backplane::{
    BackplaneError, BackplaneResult, Chains, Entry, EntrySink, LogHead, Origin, new_epoch, next_id,
    now_ms,
};
use crate::validate::Reach;
use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId};
use redb::ReadableDatabase;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Appends admitted but not yet written. Past this, `append` answers `Overloaded` at once
/// rather than queueing without bound.
pub(super) const QUEUE_CAPACITY: usize = 16 * 1024;
/// Most operations written in one group (one fsync).
const MAX_GROUP: usize = 2048;
/// Bytes of acknowledged entries waiting for redb (on disk, and to replay after a crash) past
/// which the writer waits for a checkpoint, and refuses appends if redb still cannot take
/// them.
const MAX_PENDING_BYTES: usize = 256 << 20;

pub(super) enum WriteOp {
    Append {
        doc: DocId,
        update: Bytes,
        /// Handed to the owner with the entry (see [`Entry::reach`]); not written.
        reach: Option<Reach>,
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

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) sink: Arc<OnceLock<Weak<dyn EntrySink>>>,
    pub(super) checkpoints: Arc<Checkpoints>,
    /// Appends whose chain broke are refused (see [`Chains`]).
    pub(super) chains: Chains,
}

/// What a written group hands out once the fsync returned.
enum Done {
    Append(oneshot::Sender<BackplaneResult<Position>>, Position),
    Trim(oneshot::Sender<BackplaneResult<()>>),
}

/// What a written group changes in the pending set. An append's span is within the group's
/// buffer until the group is written.
enum Change {
    Append(DocId, LogHead, StreamId, wal::Span),
    Trim(DocId, LogHead, StreamId),
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
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
        let (group, chained) = self.refuse_broken_chains(group);
        let result = self.write(group, &mut done, &mut delivered);
        if result.is_err() {
            for (doc, origin) in &chained {
                self.chains.fail(doc, Some(origin));
            }
        }
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

    /// Answers the appends whose chain broke (an earlier one failed) and returns the rest, with
    /// the chains of those that have one (to break them if this group fails).
    fn refuse_broken_chains(
        &mut self,
        group: Vec<WriteOp>,
    ) -> (Vec<WriteOp>, Vec<(DocId, Origin)>) {
        let mut kept = Vec::with_capacity(group.len());
        let mut chained = Vec::new();
        for op in group {
            if let WriteOp::Append {
                doc,
                origin: Some(origin),
                ..
            } = &op
            {
                if !self.chains.admits(doc, Some(origin)) {
                    if let WriteOp::Append { reply, .. } = op {
                        let _ = reply.send(Err(BackplaneError::EarlierAppendFailed));
                    }
                    continue;
                }
                chained.push((doc.clone(), *origin));
            }
            kept.push(op);
        }
        (kept, chained)
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
                Change::Append(d, _, id, _) if d == doc && *id < before => Some(*id),
                _ => None,
            })
            .max();
        let p = lock(&self.shared.pending);
        let pending = p.docs.get(doc).and_then(|d| {
            d.entries
                .iter()
                .map(|s| s.id)
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
        // Past the bound on what waits for redb, give redb a chance to catch up before taking more.
        if lock(&self.shared.pending).bytes > MAX_PENDING_BYTES {
            self.checkpoints.force_and_wait();
        }
        let behind = lock(&self.shared.pending).bytes > MAX_PENDING_BYTES;
        let (mut records, changes) = self.stage(group, behind, done, delivered)?;
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
        let group_at = segment.len;
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
        let (seg, reader) = (segment.seq, segment.reader.clone());
        let mut pending = lock(&self.shared.pending);
        pending.segments.entry(seg).or_insert(reader);
        apply(&mut pending, seg, group_at, changes);
        drop(pending);
        drop(active);
        if nudge {
            self.checkpoints.nudge();
        }
        Ok(())
    }

    /// Turns the group's operations into the records to write and the changes they make to
    /// the pending set, queueing every reply in `done` and every entry in `delivered`.
    // Stays whole: one pass in which each operation sees the heads the ones before it left.
    fn stage(
        &self,
        group: Vec<WriteOp>,
        behind: bool,
        done: &mut Vec<Done>,
        delivered: &mut Vec<(DocId, u64, Vec<Entry>)>,
    ) -> Result<(wal::Group, Vec<Change>), BackplaneError> {
        // Replies are collected even if the write fails half way, so every caller hears back.
        let mut pending_err: Option<BackplaneError> =
            behind.then(|| BackplaneError::Storage("the log's database is not keeping up".into()));
        let mut heads: HashMap<DocId, Option<LogHead>> = HashMap::new();
        let mut changes: Vec<Change> = Vec::with_capacity(group.len());
        let mut records = wal::Group::with_capacity(group.iter().map(record_len).sum());
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
                    reach,
                    origin,
                    reply,
                    ..
                } => {
                    let mut head = head.unwrap_or_else(fresh);
                    let id = next_id(head.last, now);
                    head.last = id;
                    let span = records.push_append(&doc, &head, origin, &update);
                    done.push(Done::Append(reply, Position::new(head.epoch, id)));
                    let entry = Entry {
                        id,
                        update,
                        origin,
                        reach,
                    };
                    match delivered.last_mut() {
                        Some((d, _, entries)) if *d == doc => entries.push(entry),
                        _ => delivered.push((doc.clone(), head.epoch, vec![entry])),
                    }
                    changes.push(Change::Append(doc.clone(), head, id, span));
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
        Ok((records, changes))
    }
}

/// Records in the pending set what a group written to segment `seg` at `group_at` changed.
fn apply(p: &mut Pending, seg: u64, group_at: u64, changes: Vec<Change>) {
    for change in changes {
        let (doc, head) = match &change {
            Change::Append(d, h, ..) | Change::Trim(d, h, _) => (d.clone(), *h),
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
            Change::Append(_, _, id, span) => {
                let span = wal::Span {
                    at: group_at + span.at,
                    len: span.len,
                };
                p.bytes += span.len as usize + ENTRY_OVERHEAD;
                d.entries.push_back(Stored { seg, id, span });
            }
            Change::Trim(_, _, before) => {
                while d.entries.front().is_some_and(|s| s.id < before) {
                    if let Some(s) = d.entries.pop_front() {
                        p.bytes = p.bytes.saturating_sub(s.span.len as usize + ENTRY_OVERHEAD);
                    }
                }
                d.trims.push((seg, before));
            }
        }
    }
}

/// Bytes of the write-ahead record `op` becomes.
fn record_len(op: &WriteOp) -> usize {
    wal::record_overhead(op.doc())
        + match op {
            WriteOp::Append { update, .. } => value_len(update),
            WriteOp::Trim { .. } => 16,
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
