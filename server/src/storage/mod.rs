//! Snapshots (data-flow step 7): a document's whole state plus the log position it covers.
//!
//! A document loads from its newest snapshot and then the log entries after the snapshot's
//! position; compaction writes a snapshot and only then trims the log. The store is a trait so
//! that nodes sharing a Redis can share a directory or an object store.

pub mod fs;
mod fs_versions;
pub mod s3;
mod s3_versions;
pub mod versions;

use bytes::Bytes;
use chorus_protocol::{DocId, Position};
use futures_util::future::BoxFuture;
use versions::{VersionId, VersionMeta};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every log entry up to and including this position is in `state`.
    pub position: Position,
    /// The document as one yrs v1 update.
    pub state: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot for {doc} is corrupt: {why}")]
    Corrupt { doc: String, why: &'static str },
}

pub trait SnapshotStore: Send + Sync + 'static {
    fn load(&self, doc: &DocId) -> BoxFuture<'static, Result<Option<Snapshot>, StoreError>>;

    /// Stores `snapshot` unless the stored one is at least as new (same epoch, position not
    /// older): a slow writer can never replace a newer snapshot with an older one. Returns
    /// whether it was written.
    fn save(&self, doc: &DocId, snapshot: Snapshot)
    -> BoxFuture<'static, Result<bool, StoreError>>;

    /// Stores a version (see [`versions`]): its state, then its metadata.
    fn put_version(
        &self,
        doc: &DocId,
        meta: VersionMeta,
        state: Bytes,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Every version of `doc`, newest first, from the metadata alone.
    fn list_versions(
        &self,
        doc: &DocId,
    ) -> BoxFuture<'static, Result<Vec<VersionMeta>, StoreError>>;

    fn get_version(
        &self,
        doc: &DocId,
        id: &VersionId,
    ) -> BoxFuture<'static, Result<Option<(VersionMeta, Bytes)>, StoreError>>;

    /// Returns whether the version existed.
    fn delete_version(
        &self,
        doc: &DocId,
        id: &VersionId,
    ) -> BoxFuture<'static, Result<bool, StoreError>>;
}
