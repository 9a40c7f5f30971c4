//! Embedded log, checkpoint side (after data-flow step 4): moves write-ahead segments into redb, and replays those a crash left at startup.

use super::shared::{ENTRY_OVERHEAD, Pending, Shared, Stored, read_stored};
use super::store::{LOG, META, head_from, head_to, trim};
use super::wal::{self, Record};
use super::wal_replay;
use super::{lock, storage};
use crate::backplane::{BackplaneResult, LogHead};
use chorus_protocol::{DocId, StreamId};
use redb::{Database, ReadableTable};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A segment is checkpointed into redb once it holds this much… It bounds one checkpoint's
/// transaction and what a crash leaves to replay. (Pending entries stay on disk, see
/// `shared.rs`; while they were held in memory this also bounded the node's growth under a
/// burst: 42 MB of overwrites grew a node by 15–17 MB at 4 MiB and 31–34 MB at 16 MiB.)
/// Steady small updates never reach it; the timer below checkpoints them.
pub(super) const CHECKPOINT_BYTES: u64 = 4 << 20;
/// …or once its first record is this old.
pub(super) const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// How soon the checkpoint thread tries again after it could not start a new segment (a full
/// disk, say): later, not in a loop.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

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
/// ([`wal_replay::plan_replay`]). Also returns the documents the segments wrote to (they may
/// have undelivered webhooks, see `hooks.rs`).
pub(super) fn replay(
    db: &Database,
    base: &Path,
    wal_id: u64,
) -> BackplaneResult<(u64, Vec<DocId>)> {
    let segments = wal_replay::plan_replay(base, wal_id)?;
    let Some(last_seq) = segments.last().map(|s| s.seq) else {
        return Ok((0, Vec::new()));
    };
    let mut replayed = Vec::new();
    let started = Instant::now();
    let mut applied = 0usize;
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut log = txn.open_table(LOG).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        let mut heads: HashMap<DocId, LogHead> = HashMap::new();
        for segment in &segments {
            match &segment.what {
                wal_replay::Holds::Nothing(wal_replay::Skipped::OtherDatabase) => {
                    tracing::warn!(segment = %segment.path.display(), "skipping a write-ahead segment written for another log file");
                }
                wal_replay::Holds::Nothing(wal_replay::Skipped::UnfinishedHeader) => {}
                wal_replay::Holds::Records { torn_bytes, .. } if *torn_bytes > 0 => {
                    tracing::warn!(
                        segment = segment.seq,
                        torn_bytes,
                        "a write-ahead segment ends in a group a crash cut short; it was never acknowledged"
                    );
                }
                wal_replay::Holds::Records { .. } => {}
            }
            for record in wal_replay::read_planned(segment)? {
                replay_record(&mut log, &mut meta, &mut heads, record)?;
                applied += 1;
            }
        }
        replayed.extend(heads.keys().cloned());
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
    Ok((last_seq, replayed))
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

/// The checkpoint thread's mailbox. The thread decides when a segment is due (its age, or
/// its size as the writer reports it), ends it, and writes what it held into redb; the
/// writer never waits for redb.
#[derive(Default)]
pub(super) struct Checkpoints {
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
    pub(super) fn nudge(&self) {
        let _s = lock(&self.state);
        self.changed.notify_all();
    }

    /// Has a checkpoint run now and waits until it finished.
    pub(super) fn force_and_wait(&self) {
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

    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// The checkpoint thread: until closed, checkpoints each segment when it is due.
    pub(super) fn serve(&self, shared: &Shared) {
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
    let copies = copies_upto(&lock(&shared.pending), upto)?;
    if copies.is_empty() {
        remove_segments(&shared.base, upto)?;
        return Ok(None);
    }
    let marks = shared.hooks_on.load(std::sync::atomic::Ordering::Acquire);
    let written = write_copies(&shared.db, &copies, marks)?;
    forget(&mut lock(&shared.pending), &copies, upto);
    remove_segments(&shared.base, upto)?;
    Ok(Some(written))
}

/// What a checkpoint takes of one document from the pending set.
struct DocCopy {
    doc: DocId,
    head: LogHead,
    entries: Vec<(Arc<File>, Stored)>,
    trims: Vec<StreamId>,
}

/// What segments `..=upto` hold, by document.
fn copies_upto(p: &Pending, upto: u64) -> BackplaneResult<Vec<DocCopy>> {
    p.docs
        .iter()
        .filter(|(_, d)| {
            d.head_seg <= upto
                || d.entries.front().is_some_and(|s| s.seg <= upto)
                || d.trims.iter().any(|(seg, _)| *seg <= upto)
        })
        .map(|(doc, d)| {
            Ok(DocCopy {
                doc: doc.clone(),
                // The newest head, even if a later segment changed it: that segment stays
                // until the next checkpoint, and replay never moves a head backwards.
                head: d.head,
                entries: d
                    .entries
                    .iter()
                    .take_while(|s| s.seg <= upto)
                    .map(|s| p.locate(s))
                    .collect::<BackplaneResult<_>>()?,
                trims: d
                    .trims
                    .iter()
                    .filter(|(seg, _)| *seg <= upto)
                    .map(|(_, before)| *before)
                    .collect(),
            })
        })
        .collect()
}

/// Writes `copies` into redb in one transaction; returns how many entries it wrote. With
/// `marks`, the documents that got entries are marked as having undelivered webhooks in the
/// same transaction.
fn write_copies(db: &Database, copies: &[DocCopy], marks: bool) -> BackplaneResult<usize> {
    let mut written = 0;
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut log = txn.open_table(LOG).map_err(storage)?;
        let mut meta = txn.open_table(META).map_err(storage)?;
        for c in copies {
            // A pending entry is never older than a trim recorded before it (trims cut below
            // the head), so trims first, then inserts, is the order they happened in.
            for before in &c.trims {
                trim(&mut log, &c.doc, *before)?;
            }
            for (file, e) in &c.entries {
                // The record's value is the row, byte for byte.
                let value = read_stored(file, e)?;
                log.insert((c.doc.as_str(), e.id.ms, e.id.seq), &value[..])
                    .map_err(storage)?;
                written += 1;
            }
            meta.insert(c.doc.as_str(), head_to(&c.head))
                .map_err(storage)?;
        }
        if marks {
            super::hooks::mark(
                &txn,
                copies
                    .iter()
                    .filter(|c| !c.entries.is_empty())
                    .map(|c| &c.doc),
            )?;
        }
    }
    txn.commit().map_err(storage)?;
    Ok(written)
}

/// Forgets from the pending set what segments `..=upto` held, now that redb holds `copies`.
fn forget(p: &mut Pending, copies: &[DocCopy], upto: u64) {
    let mut freed = 0;
    for c in copies {
        let Some(d) = p.docs.get_mut(&c.doc) else {
            continue;
        };
        while d.entries.front().is_some_and(|s| s.seg <= upto) {
            if let Some(s) = d.entries.pop_front() {
                freed += s.span.len as usize + ENTRY_OVERHEAD;
            }
        }
        d.trims.retain(|(seg, _)| *seg > upto);
        if d.entries.is_empty() && d.trims.is_empty() && d.head_seg <= upto {
            p.docs.remove(&c.doc);
        }
    }
    p.bytes = p.bytes.saturating_sub(freed);
    p.segments.retain(|seg, _| *seg > upto);
}

fn remove_segments(base: &Path, upto: u64) -> BackplaneResult<()> {
    for (seq, path) in wal::list_segments(base).map_err(storage)? {
        if seq <= upto {
            std::fs::remove_file(path).map_err(storage)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::EmbeddedBackplane;
    use super::super::tests::{NEVER, append_n, crash_image, entry_ids, scratch};
    use super::*;
    use crate::backplane::{Backplane, BackplaneError};
    use bytes::Bytes;
    use std::sync::Arc;
    use tokio_util::task::TaskTracker;

    #[tokio::test]
    async fn replay_cuts_a_torn_tail_and_refuses_a_damaged_middle() {
        let (dir, path) = scratch();
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
        let starts = wal_replay::group_starts(&segment(&log));
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
            Err(BackplaneError::Wal(wal_replay::WalError::Corrupt { path, offset, .. })) => {
                assert_eq!((path, offset), (damaged.clone(), starts[1]));
            }
            Err(other) => panic!("expected corruption, got {other}"),
            Ok(_) => panic!("a log with a damaged acknowledged entry opened"),
        }
        assert!(damaged.exists(), "nothing is deleted: the operator decides");
    }

    #[tokio::test]
    async fn a_segment_left_beside_a_new_log_file_is_not_replayed_into_it() {
        let (dir, path) = scratch();
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
        let (_dir, path) = scratch();
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
                        .append(&doc, Bytes::from(i.to_le_bytes().to_vec()), None, None)
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
