//! A document's owner, for the inspector (read side): its bookkeeping as [`OwnerFacts`].

use super::Owner;
use crate::doc::inspect::OwnerFacts;
use std::collections::BTreeMap;

impl Owner {
    /// Cheap on the owner: the state is the cached whole-document encoding when the document
    /// has not moved since it was last encoded; walking and decoding it happen elsewhere.
    pub(super) fn facts(&self) -> OwnerFacts {
        let mut subscribers: BTreeMap<&'static str, usize> = BTreeMap::new();
        for sub in self.subs.values() {
            *subscribers.entry(sub.outbox.wire.name()).or_default() += 1;
        }
        OwnerFacts {
            position: self.position(),
            state: self.encode_whole(),
            since_snapshot: self.since_snapshot,
            snapshot: self.snapshot,
            last_compaction: self.last_compaction,
            subscribers,
            replay_memory: (self.recent.len(), self.recent_bytes),
            gap: self.gap,
            missing_deps: self.missing_deps,
        }
    }
}
