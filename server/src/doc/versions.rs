//! Versions, the document side: the policy for automatic versions (`--version-interval`,
//! `--keep-versions`) that each owner task follows, and the store the HTTP API keeps named
//! versions in (the node's snapshot store; see [`crate::storage::versions`]).

use super::Registry;
use crate::storage::SnapshotStore;
use std::sync::Arc;
use std::time::Duration;

/// When owners keep automatic versions.
#[derive(Debug, Clone, Copy)]
pub struct VersionPolicy {
    /// A version once this long after the first edit since the last one; zero: never.
    pub interval: Duration,
    /// Automatic versions kept per document (the newest); named ones are never pruned.
    pub keep: usize,
}

impl VersionPolicy {
    pub const OFF: VersionPolicy = VersionPolicy {
        interval: Duration::ZERO,
        keep: 0,
    };
}

impl Registry {
    /// Where versions (and snapshots) live.
    pub fn snapshot_store(&self) -> Arc<dyn SnapshotStore> {
        self.shared.store.clone()
    }
}
