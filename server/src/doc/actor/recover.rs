//! A document's owner meets its log again (data-flow steps 2, 5 and 7): catch-up reads, epoch
//! changes and trim-floor gaps, and the check before every snapshot.
//!
//! A position means "everything up to here", so the owner may never apply an entry, or hand
//! out its position, while an older one it has not applied is gone from the log. Entries leave
//! a log two ways: compaction trims what a snapshot covers (the log's `floor` says how far),
//! and a log that is lost is recreated under a new epoch. Every read of the log here compares
//! its head with what the owner applied:
//!
//! - same epoch, `floor <= applied`: everything after `applied` is still there; apply it.
//! - same epoch, `floor > applied` (a gap: the owner's reader was cut off, paused or behind for
//!   longer than the replay window while another node compacted): reload from the newest
//!   snapshot, which covers every trimmed entry because compaction saves before it trims,
//!   merged into what the owner holds (a CRDT merge loses nothing), then the log after it.
//! - another epoch: keep the CRDT state (it is a superset of the lost log), take the new log
//!   (through its snapshot too, if the new log was already trimmed), resync every subscriber.
//!
//! While a gap is known the owner saves no snapshot (its state lacks the gap, and a newer
//! position would replace the good snapshot and make the loss permanent), applies no entries
//! and hands out no positions; a reload that fails is retried on a timer.

use super::Owner;
use crate::backplane::{Entry, LogHead};
use crate::doc::SyncFrom;
use crate::storage::Snapshot;
use chorus_protocol::StreamId;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, Transact, Update};

/// Times a load (or reload) reads the snapshot and the log again when the log was trimmed past
/// the snapshot it read: another node saved a newer snapshot and trimmed between our two
/// reads, and the next read finds that snapshot.
const READ_TRIES: u32 = 5;

/// How long a failed reload (or log read) waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A snapshot and the log after it that together hold every entry of the log's epoch.
pub(super) struct Whole {
    pub snapshot: Option<Snapshot>,
    pub head: LogHead,
    pub entries: Vec<Entry>,
}

impl Whole {
    /// The snapshot's position id if it belongs to the log's epoch (it is the base the log's
    /// entries apply after), else zero.
    pub fn covered(&self) -> StreamId {
        match &self.snapshot {
            Some(s) if self.head.epoch != 0 && s.position.epoch == self.head.epoch => s.position.id,
            _ => StreamId::ZERO,
        }
    }
}

impl Owner {
    /// Reads the newest snapshot and then the whole log, again while the log turns out to be
    /// trimmed past that snapshot (see [`READ_TRIES`]). Fails if it stays so: the snapshot
    /// store lacks a snapshot the log relies on, and loading anyway would be a silent gap.
    pub(super) async fn read_whole(&mut self) -> Result<Whole, String> {
        let mut attempt = 0;
        loop {
            let snapshot = self
                .shared
                .store
                .load(&self.doc)
                .await
                .map_err(|e| e.to_string())?;
            // A read creates no log: a document nobody wrote reads as epoch 0 (see `LogHead`).
            let (head, entries) = self
                .shared
                .backplane
                .read_after(&self.doc, StreamId::ZERO)
                .await
                .map_err(|e| e.to_string())?;
            let whole = Whole {
                snapshot,
                head,
                entries,
            };
            let covered = whole.covered();
            if whole.head.holds_after(covered) {
                return Ok(whole);
            }
            attempt += 1;
            if attempt >= READ_TRIES {
                return Err(format!(
                    "the log (epoch {}) was trimmed up to {} but the newest snapshot covers only {}: \
                     the snapshot store lacks the snapshot those entries went into",
                    whole.head.epoch, whole.head.floor, covered
                ));
            }
            tracing::debug!(doc = %self.doc, floor = %whole.head.floor, %covered, "log trimmed past the snapshot just read; reading again");
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
        }
    }

    /// The entry queue overflowed or a reader may have skipped entries: read the log after
    /// what we applied, and check nothing between was trimmed.
    pub(super) async fn catch_up(&mut self) {
        if self.gap && self.retry_at.is_some() {
            return; // a reload is already due on the timer
        }
        if self.gap {
            return self.recover_gap().await;
        }
        match self
            .shared
            .backplane
            .read_after(&self.doc, self.applied)
            .await
        {
            Ok((head, _)) if head.epoch == self.epoch && !head.holds_after(self.applied) => {
                tracing::warn!(doc = %self.doc, applied = %self.applied, floor = %head.floor,
                    "the log was trimmed past what this node applied; reloading from the newest snapshot");
                self.recover_gap().await;
            }
            Ok((head, entries)) if head.epoch == self.epoch => {
                let fresh = self.ingest(entries);
                self.fan_out_all(&fresh);
                self.note_edits(!fresh.is_empty());
                self.wake_waiters();
            }
            Ok(_) => self.reset_epoch().await,
            Err(e) => {
                tracing::warn!(doc = %self.doc, error = %e, "catch-up read failed; retrying");
                self.retry_later();
            }
        }
    }

    /// Whether the log (still of our epoch) was trimmed past `before`. Asked when entries just
    /// applied wait for dependencies the document never received: the surest sign of a gap,
    /// whichever reader missed the entries.
    pub(super) async fn trimmed_after(&mut self, before: StreamId) -> bool {
        match self
            .shared
            .backplane
            .read_after(&self.doc, self.applied)
            .await
        {
            Ok((head, _)) => head.epoch == self.epoch && !head.holds_after(before),
            // Unknown: take it as a gap. A reload that finds none costs one resync.
            Err(e) => {
                tracing::warn!(doc = %self.doc, error = %e, "could not read the log's floor; reloading to be safe");
                true
            }
        }
    }

    /// Reads the log again after [`RETRY_AFTER`] (the owner's loop turns this into a catch-up).
    fn retry_later(&mut self) {
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
    }

    /// The retry timer fired: the next turn of the loop catches up (or reloads).
    pub(super) fn on_retry(&mut self) {
        self.retry_at = None;
        self.handle.inner.lagged.store(true, Ordering::Release);
    }

    /// Entries after `applied` were trimmed before we applied them: reload from the newest
    /// snapshot plus the log after it, then resync every subscriber.
    pub(super) async fn recover_gap(&mut self) {
        if !self.gap {
            self.gap = true;
            metrics::counter!(crate::metrics::names::LOG_GAPS).increment(1);
        }
        match self.read_whole().await {
            Ok(whole) => {
                if let Err(e) = self.rebase(whole).await {
                    tracing::error!(doc = %self.doc, error = %e, "reloading after a trimmed gap failed; retrying");
                    self.retry_later();
                }
            }
            Err(e) => {
                tracing::error!(doc = %self.doc, error = %e, "reloading after a trimmed gap failed; retrying");
                self.retry_later();
            }
        }
    }

    /// The log was recreated under us (a new epoch): keep the CRDT state (it is a superset),
    /// take every entry of the new log (through its snapshot if it was trimmed already), and
    /// resync every subscriber from scratch.
    pub(super) async fn reset_epoch(&mut self) {
        let whole = match self
            .shared
            .backplane
            .read_after(&self.doc, StreamId::ZERO)
            .await
        {
            Ok((head, entries)) if head.holds_after(StreamId::ZERO) => Whole {
                snapshot: None,
                head,
                entries,
            },
            // The new log was compacted already: its first entries are only in its snapshot.
            Ok(_) => return self.recover_gap().await,
            Err(e) => {
                tracing::warn!(doc = %self.doc, error = %e, "reading the recreated log failed; retrying");
                self.retry_later();
                return;
            }
        };
        if let Err(e) = self.rebase(whole).await {
            tracing::error!(doc = %self.doc, error = %e, "taking the recreated log failed; retrying");
            self.gap = true;
            self.retry_later();
        }
    }

    /// Moves the owner onto `whole` (a snapshot and the log after it, checked to have no gap):
    /// merges the snapshot into what we hold when it is ahead of us, applies the log after it,
    /// and resyncs every subscriber. Ends a known gap.
    async fn rebase(&mut self, whole: Whole) -> Result<(), String> {
        let covered = whole.covered();
        let epoch_changed = whole.head.epoch != self.epoch;
        if epoch_changed {
            if self.epoch == 0 {
                // The document's first write made its log: routine, not a lost log.
                tracing::debug!(doc = %self.doc, epoch = whole.head.epoch, "log created; resyncing subscribers");
            } else {
                tracing::warn!(doc = %self.doc, epoch = whole.head.epoch, "log epoch changed; resyncing subscribers");
            }
            self.applied = StreamId::ZERO;
            self.snapshot = None;
        }
        if let Some(s) = whole.snapshot.filter(|_| covered > self.applied) {
            self.merge_snapshot(&s.state)?;
            self.applied = covered;
            self.snapshot = Some(s.position);
        }
        self.epoch = whole.head.epoch;
        // Nothing remembered for replay may span the gap.
        self.recent.clear();
        self.recent_bytes = 0;
        self.recent_floor = self.applied;
        self.since_snapshot = (0, 0);
        self.forget_encoded();
        let fresh = self.ingest(whole.entries);
        self.gap = false;
        self.retry_at = None;
        if epoch_changed {
            // The reader may stand past the new log's ids; point it at what we applied.
            self.shared.backplane.watch(&self.doc, self.applied);
        }
        self.resync_all(&fresh);
        self.note_edits(!fresh.is_empty());
        self.wake_waiters();
        if epoch_changed {
            // What we hold beyond the new log (everything from before it was lost) goes into a
            // snapshot of the new epoch, so a node loading the document later has it too.
            self.save_snapshot_locked().await;
        }
        Ok(())
    }

    /// Applies a stored snapshot on top of what we hold (yrs skips what we already have) and
    /// publishes the exact state vector it leads to.
    fn merge_snapshot(&mut self, state: &[u8]) -> Result<(), String> {
        let doc = self.awareness.doc().clone();
        let merged = catch_unwind(AssertUnwindSafe(|| {
            let update =
                Update::decode_v1(state).map_err(|e| format!("snapshot does not decode: {e}"))?;
            let mut txn = doc.transact_mut();
            txn.apply_update(update)
                .map_err(|e| format!("snapshot does not apply: {e}"))?;
            Ok::<_, String>(txn.state_vector())
        }))
        .map_err(|_| "snapshot made yrs panic".to_string())??;
        self.handle
            .inner
            .approx_size
            .fetch_max(state.len(), Ordering::Relaxed);
        self.handle
            .publish_known(merged.iter().map(|(c, k)| (*c, *k)), true);
        Ok(())
    }

    /// Brings every subscriber to the current position with the whole state (their positions
    /// are from before the change, so no replay can be exact), and acknowledges our clients'
    /// entries among `fresh` at that position (never behind it).
    fn resync_all(&self, fresh: &[Entry]) {
        let conns: Vec<u64> = self.subs.keys().copied().collect();
        for conn in conns {
            self.send_sync(conn, &SyncFrom::default());
        }
        let position = self.position();
        for e in fresh {
            if let Some(o) = e.origin.filter(|o| o.node == self.shared.node)
                && let Some(sub) = self.subs.get(&o.conn)
            {
                sub.outbox.push_own(&self.doc, o.seq, position);
            }
        }
    }

    /// Before a snapshot is saved: the log must still be the one we applied, with nothing
    /// trimmed that we lack. Otherwise our snapshot would carry our epoch's position over a
    /// newer log's snapshot, or a position past a gap. Entries we had not read yet are applied
    /// (and fanned out) first, so the snapshot covers the log's head. Returns whether saving
    /// may go on.
    pub(super) async fn log_still_ours(&mut self) -> bool {
        if self.gap {
            return false;
        }
        match self
            .shared
            .backplane
            .read_after(&self.doc, self.applied)
            .await
        {
            Ok((head, entries)) if head.epoch == self.epoch && head.holds_after(self.applied) => {
                let fresh = self.ingest(entries);
                self.fan_out_all(&fresh);
                self.note_edits(!fresh.is_empty());
                self.wake_waiters();
                true
            }
            Ok(_) => {
                // Another epoch, or a gap: the owner's loop sorts it out before any save.
                self.handle.inner.lagged.store(true, Ordering::Release);
                false
            }
            Err(e) => {
                tracing::warn!(doc = %self.doc, error = %e, "reading the log before a snapshot failed; not saving");
                false
            }
        }
    }
}
