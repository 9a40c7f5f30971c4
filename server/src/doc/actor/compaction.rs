//! A document's owner, compaction (data-flow step 7): snapshot under the document's lock,
//! then trim the log behind the replay window; the save on unload.

use super::Owner;
use crate::backplane::now_ms;
use crate::storage::Snapshot;
use chorus_protocol::StreamId;
use std::sync::atomic::Ordering;

/// How long one node may hold a document's compaction lock (snapshot + trim).
const COMPACTION_LOCK: std::time::Duration = std::time::Duration::from_secs(30);

impl Owner {
    pub(super) async fn maybe_compact(&mut self) {
        let s = self.shared.settings.clone();
        let (entries, bytes) = self.since_snapshot;
        let snapshot_bytes = self.handle.approx_size().saturating_sub(bytes);
        if !compaction_due(entries, bytes, snapshot_bytes, &s) {
            return;
        }
        // Every node applies every entry, so all of them reach the threshold together; the
        // lock lets one compact. The others start counting afresh instead of asking again on
        // every entry.
        match self
            .shared
            .backplane
            .lock_compaction(&self.doc, COMPACTION_LOCK)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.since_snapshot = (0, 0);
                return;
            }
            Err(e) => {
                tracing::warn!(doc = %self.doc, error = %e, "compaction lock unavailable; retrying later");
                self.since_snapshot = (0, 0);
                return;
            }
        }
        self.compact_locked(&s).await;
        self.shared.backplane.unlock_compaction(&self.doc).await;
    }

    /// Snapshot first, trim after: a crash in between leaves a log that still holds
    /// everything the snapshot covers, so nothing is lost.
    pub(super) async fn compact_locked(&mut self, s: &crate::doc::DocSettings) {
        if !self.save_snapshot().await {
            return;
        }
        // Keep the replay window behind the snapshot; everything older is in the snapshot.
        let window_start = StreamId::new(
            now_ms().saturating_sub(s.replay_window.as_millis() as u64),
            0,
        );
        let before = window_start.min(self.applied.successor());
        if let Err(e) = self.shared.backplane.trim(&self.doc, before).await {
            tracing::warn!(doc = %self.doc, error = %e, "trimming the log failed; it will be retried at the next compaction");
        }
    }

    /// Saves a snapshot under the compaction lock (nodes sharing a snapshot store take turns).
    /// Without the lock nothing is saved: another node is saving, and the log still holds
    /// everything.
    pub(super) async fn save_snapshot_locked(&mut self) {
        if let Ok(true) = self
            .shared
            .backplane
            .lock_compaction(&self.doc, COMPACTION_LOCK)
            .await
        {
            self.save_snapshot().await;
            self.shared.backplane.unlock_compaction(&self.doc).await;
        }
    }

    /// Saves a snapshot if anything was applied since the last one. Returns whether the stored
    /// snapshot now covers everything applied.
    pub(super) async fn save_snapshot(&mut self) -> bool {
        let position = self.position();
        if self.snapshot == Some(position)
            || (self.applied == StreamId::ZERO && self.snapshot.is_none())
        {
            return !self.gap;
        }
        if !self.log_still_ours().await {
            return false;
        }
        let position = self.position();
        if self.snapshot == Some(position) {
            return true;
        }
        let state = self.encode_whole();
        self.handle
            .inner
            .approx_size
            .store(state.len(), Ordering::Relaxed);
        let snapshot = Snapshot { position, state };
        match self.shared.store.save(&self.doc, snapshot).await {
            Ok(_) => {
                self.snapshot = Some(position);
                self.since_snapshot = (0, 0);
                self.last_compaction = Some((std::time::SystemTime::now(), position));
                tracing::debug!(doc = %self.doc, %position, "snapshot saved");
                true
            }
            Err(e) => {
                tracing::error!(doc = %self.doc, error = %e, "saving the snapshot failed; the log still holds everything");
                false
            }
        }
    }
}

/// A snapshot encodes and writes the whole document, so it waits until the log behind it is
/// worth that: `compact_entries` entries whose bytes are at least a quarter of the last
/// snapshot (at most four bytes of snapshot written per byte of log: a large document typed
/// into one character at a time is not rewritten every thousand keystrokes), or sixteen times
/// that many entries whatever their size (what a cold load replays stays bounded), or
/// `compact_bytes`.
fn compaction_due(
    entries: usize,
    bytes: usize,
    snapshot_bytes: usize,
    s: &crate::doc::DocSettings,
) -> bool {
    const SNAPSHOT_BYTES_PER_LOG_BYTE: usize = 4;
    const MOST_ENTRIES_FACTOR: usize = 16;
    bytes >= s.compact_bytes
        || entries >= s.compact_entries.saturating_mul(MOST_ENTRIES_FACTOR)
        || (entries >= s.compact_entries
            && bytes.saturating_mul(SNAPSHOT_BYTES_PER_LOG_BYTE) >= snapshot_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> crate::doc::DocSettings {
        crate::doc::DocSettings {
            evict_after: Duration::from_secs(30),
            compact_entries: 1000,
            compact_bytes: 4 << 20,
            replay_window: Duration::from_secs(600),
            replay_memory_bytes: 1 << 20,
            max_hot_documents: 10_000,
            versions: crate::doc::versions::VersionPolicy::OFF,
        }
    }

    #[test]
    fn compaction_waits_until_the_log_is_worth_rewriting_the_document() {
        let s = settings();
        // A small document compacts every `compact_entries` entries, as configured.
        assert!(!compaction_due(999, 30_000, 0, &s));
        assert!(compaction_due(1000, 30_000, 0, &s));
        assert!(compaction_due(1000, 30_000, 100_000, &s));
        // A 37 MB document typed into one character at a time (~30 bytes an entry) is not
        // rewritten every thousand keystrokes...
        let big = 37 << 20;
        assert!(!compaction_due(1000, 30_000, big, &s));
        assert!(!compaction_due(15_999, 480_000, big, &s));
        // ...but a cold load never replays more than sixteen times that many entries.
        assert!(compaction_due(16_000, 480_000, big, &s));
        // Large updates compact once their bytes are a quarter of the snapshot, or by bytes.
        assert!(compaction_due(1000, big / 4, big, &s));
        assert!(compaction_due(10, 4 << 20, big, &s));
    }
}
