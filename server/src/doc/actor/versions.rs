//! A document's owner, automatic versions: the first edit after a version starts the clock
//! (`--version-interval`); when it runs out, or when the document unloads with edits not yet
//! kept, the owner encodes its state and a tracked task stores it and prunes the oldest
//! automatic versions past `--keep-versions`.
//!
//! Every node applies every entry, so in a shared deployment every node's clock runs out at
//! about the same moment. The writer takes the document's compaction lock (one node at a time
//! writes what the snapshot store holds for a document), and skips when the newest automatic
//! version already covers its position, or, when its clock ran out, is younger than half the
//! interval (another node kept this round a moment ago, a few entries behind at most).

use super::Owner;
use crate::storage::versions::{VersionKind, VersionMeta, prune_auto};
use std::time::Duration;
use tokio::time::Instant;

/// How long a version writer may hold the document's compaction lock.
const VERSION_LOCK: Duration = Duration::from_secs(30);

/// Why a version is kept now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Occasion {
    /// The clock ran out.
    Due,
    /// The document unloads with edits not yet kept.
    Unload,
}

impl Owner {
    /// Called after each turn of applied entries.
    pub(super) fn note_edits(&mut self, edited: bool) {
        let interval = self.shared.settings.versions.interval;
        if edited && !interval.is_zero() && self.version_due.is_none() {
            self.version_due = Some(Instant::now() + interval);
        }
    }

    /// The clock ran out (or the document unloads with edits not yet kept): hand the state to a
    /// tracked task that stores it.
    pub(super) fn keep_auto_version(&mut self, occasion: Occasion) {
        if self.version_due.take().is_none() || self.gap {
            return;
        }
        let policy = self.shared.settings.versions;
        let state = self.encode_whole();
        let meta = VersionMeta::new(self.position(), None, state.len());
        let (store, backplane, doc) = (
            self.shared.store.clone(),
            self.shared.backplane.clone(),
            self.doc.clone(),
        );
        let cancel = self.shared.cancel.clone();
        self.shared.tracker.spawn(async move {
            match backplane.lock_compaction(&doc, VERSION_LOCK).await {
                Ok(true) => {}
                Ok(false) => return, // another node is writing for this document
                Err(e) => {
                    tracing::warn!(doc = %doc, error = %e, "version lock unavailable; this round's version is skipped");
                    return;
                }
            }
            let write = async {
                let newest_auto = store
                    .list_versions(&doc)
                    .await?
                    .into_iter()
                    .find(|m| m.kind == VersionKind::Auto);
                let half = u64::try_from(policy.interval.as_millis() / 2).unwrap_or(u64::MAX);
                let kept = newest_auto.is_some_and(|m| {
                    let covers = m.position.epoch == meta.position.epoch
                        && m.position.id >= meta.position.id;
                    let recent = m.created_ms().saturating_add(half) > meta.created_ms();
                    covers || (occasion == Occasion::Due && recent)
                });
                if kept {
                    return Ok(false);
                }
                store.put_version(&doc, meta, state).await?;
                prune_auto(store.as_ref(), &doc, policy.keep).await?;
                Ok::<_, crate::storage::StoreError>(true)
            };
            // Bounded like the lock it holds; a shutdown waits for it (the tracker).
            match tokio::time::timeout(VERSION_LOCK, write).await {
                Ok(Ok(true)) => tracing::debug!(doc = %doc, "automatic version kept"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(doc = %doc, error = %e, "keeping an automatic version failed"),
                Err(_) if cancel.is_cancelled() => {}
                Err(_) => tracing::warn!(doc = %doc, "keeping an automatic version timed out"),
            }
            backplane.unlock_compaction(&doc).await;
        });
    }
}
