//! Snapshots as files in a local (or shared) directory, written atomically.
//!
//! File layout: `CHSNAP01` magic, then epoch, stream-id ms and seq (u64 LE each), the state's
//! length (u64 LE) and CRC-32, then the state. A write goes to a temporary file that is fsynced
//! and renamed over the old one, then the directory is fsynced: a crash leaves either the old
//! or the new snapshot, never a torn one, and the checksum catches anything the disk mangles.

use super::fs_versions;
use super::versions::{VersionId, VersionMeta};
use super::{Snapshot, SnapshotStore, StoreError};
use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MAGIC: &[u8; 8] = b"CHSNAP01";
const HEADER: usize = 8 + 8 * 4 + 4;

pub struct FsSnapshotStore {
    dir: Arc<PathBuf>,
    /// Serializes compare-and-write so two saves of one document cannot interleave.
    write_lock: Arc<Mutex<()>>,
}

impl FsSnapshotStore {
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(FsSnapshotStore {
            dir: Arc::new(dir),
            write_lock: Arc::new(Mutex::new(())),
        })
    }

    fn path(dir: &Path, doc: &DocId) -> PathBuf {
        // Document ids are restricted to a filename-safe alphabet (see `DocId`).
        dir.join(format!("{doc}.snap"))
    }
}

fn read_header(bytes: &[u8], doc: &DocId) -> Result<(Position, usize, u32), StoreError> {
    let corrupt = |why| StoreError::Corrupt {
        doc: doc.to_string(),
        why,
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(corrupt("bad header"));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let position = Position::new(u64_at(8), StreamId::new(u64_at(16), u64_at(24)));
    let len = usize::try_from(u64_at(32)).map_err(|_| corrupt("bad length"))?;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[40..44]);
    Ok((position, len, u32::from_le_bytes(crc)))
}

/// The snapshot file format, shared with the object-store backend.
pub(crate) fn encode(snap: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + snap.state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&snap.position.epoch.to_le_bytes());
    out.extend_from_slice(&snap.position.id.ms.to_le_bytes());
    out.extend_from_slice(&snap.position.id.seq.to_le_bytes());
    out.extend_from_slice(&(snap.state.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&snap.state).to_le_bytes());
    out.extend_from_slice(&snap.state);
    out
}

/// Parses and checks (length, CRC) a snapshot in the shared format.
pub(crate) fn decode(bytes: &[u8], doc: &DocId) -> Result<Snapshot, StoreError> {
    let (position, len, crc) = read_header(bytes, doc)?;
    let state = &bytes[HEADER..];
    if state.len() != len || crc32fast::hash(state) != crc {
        return Err(StoreError::Corrupt {
            doc: doc.to_string(),
            why: "checksum or length mismatch",
        });
    }
    Ok(Snapshot {
        position,
        state: Bytes::copy_from_slice(state),
    })
}

fn load(dir: &Path, doc: &DocId) -> Result<Option<Snapshot>, StoreError> {
    let mut file = match File::open(FsSnapshotStore::path(dir, doc)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    decode(&bytes, doc).map(Some)
}

fn stored_position(path: &Path, doc: &DocId) -> Option<Position> {
    let mut head = [0u8; HEADER];
    let mut f = File::open(path).ok()?;
    f.read_exact(&mut head).ok()?;
    read_header(&head, doc).ok().map(|(p, _, _)| p)
}

fn save(dir: &Path, lock: &Mutex<()>, doc: &DocId, snap: &Snapshot) -> Result<bool, StoreError> {
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    let path = FsSnapshotStore::path(dir, doc);
    if let Some(old) = stored_position(&path, doc)
        && old.epoch == snap.position.epoch
        && old.id >= snap.position.id
    {
        return Ok(false);
    }
    // Unique per writer: nodes sharing the directory must never write into the same temp file.
    let tmp = dir.join(format!(
        ".{doc}.snap.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&encode(snap))?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(true)
}

impl SnapshotStore for FsSnapshotStore {
    fn load(&self, doc: &DocId) -> BoxFuture<'static, Result<Option<Snapshot>, StoreError>> {
        let (dir, doc) = (self.dir.clone(), doc.clone());
        async move {
            tokio::task::spawn_blocking(move || load(&dir, &doc))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        }
        .boxed()
    }

    fn save(
        &self,
        doc: &DocId,
        snapshot: Snapshot,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (dir, lock, doc) = (self.dir.clone(), self.write_lock.clone(), doc.clone());
        async move {
            tokio::task::spawn_blocking(move || save(&dir, &lock, &doc, &snapshot))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
        }
        .boxed()
    }

    fn put_version(
        &self,
        doc: &DocId,
        meta: VersionMeta,
        state: Bytes,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (dir, doc) = (self.dir.clone(), doc.clone());
        blocking(move || fs_versions::put(&dir, &doc, &meta, state))
    }

    fn list_versions(
        &self,
        doc: &DocId,
    ) -> BoxFuture<'static, Result<Vec<VersionMeta>, StoreError>> {
        let (dir, doc) = (self.dir.clone(), doc.clone());
        blocking(move || fs_versions::list(&dir, &doc))
    }

    fn get_version(
        &self,
        doc: &DocId,
        id: &VersionId,
    ) -> BoxFuture<'static, Result<Option<(VersionMeta, Bytes)>, StoreError>> {
        let (dir, doc, id) = (self.dir.clone(), doc.clone(), id.clone());
        blocking(move || fs_versions::get(&dir, &doc, &id))
    }

    fn delete_version(
        &self,
        doc: &DocId,
        id: &VersionId,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (dir, doc, id) = (self.dir.clone(), doc.clone(), id.clone());
        blocking(move || fs_versions::delete(&dir, &doc, &id))
    }
}

/// Runs file I/O off the async threads.
fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> BoxFuture<'static, Result<T, StoreError>> {
    async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(epoch: u64, ms: u64, state: &'static [u8]) -> Snapshot {
        Snapshot {
            position: Position::new(epoch, StreamId::new(ms, 0)),
            state: Bytes::from_static(state),
        }
    }

    #[tokio::test]
    async fn saves_load_back_and_never_go_backwards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FsSnapshotStore::open(dir.path()).expect("open");
        let doc = DocId::parse("doc-1").expect("id");
        assert_eq!(store.load(&doc).await.expect("load"), None);
        assert!(store.save(&doc, snap(1, 10, b"ten")).await.expect("save"));
        assert!(
            !store
                .save(&doc, snap(1, 5, b"five"))
                .await
                .expect("older is refused")
        );
        assert_eq!(
            store.load(&doc).await.expect("load"),
            Some(snap(1, 10, b"ten"))
        );
        // A new epoch (the log was recreated) always replaces.
        assert!(store.save(&doc, snap(2, 1, b"new")).await.expect("save"));
        assert_eq!(
            store.load(&doc).await.expect("load"),
            Some(snap(2, 1, b"new"))
        );
    }

    #[tokio::test]
    async fn corruption_is_reported_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FsSnapshotStore::open(dir.path()).expect("open");
        let doc = DocId::parse("d").expect("id");
        store.save(&doc, snap(1, 1, b"state")).await.expect("save");
        let path = dir.path().join("d.snap");
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).expect("write");
        assert!(matches!(
            store.load(&doc).await,
            Err(StoreError::Corrupt { .. })
        ));
    }
}
