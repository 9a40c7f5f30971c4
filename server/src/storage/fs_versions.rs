//! Versions in the filesystem store: `SNAPSHOT_DIR/.versions/DOC/ID.{state,json}` (see
//! [`super::versions`]), each written to a temporary file, fsynced and renamed into place.

use super::Snapshot;
use super::StoreError;
use super::fs::{decode, encode};
use super::versions::{VersionId, VersionMeta, folder};
use bytes::Bytes;
use chorus_protocol::DocId;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Ids are checked by [`VersionId::parse`] and document ids by `DocId`: neither can climb out
/// of the folder.
fn paths(dir: &Path, doc: &DocId, id: &VersionId) -> (PathBuf, PathBuf) {
    let folder = dir.join(folder(doc));
    (
        folder.join(format!("{id}.state")),
        folder.join(format!("{id}.json")),
    )
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

pub(super) fn put(
    dir: &Path,
    doc: &DocId,
    meta: &VersionMeta,
    state: Bytes,
) -> Result<(), StoreError> {
    let (state_path, meta_path) = paths(dir, doc, &meta.id);
    if let Some(parent) = state_path.parent() {
        fs::create_dir_all(parent)?;
    }
    let snapshot = Snapshot {
        position: meta.position,
        state,
    };
    write_atomically(&state_path, &encode(&snapshot))?;
    sync_dir(&state_path)?;
    // The metadata last: a version is listed only once its state is durable.
    write_atomically(&meta_path, &meta.to_json())?;
    sync_dir(&meta_path)?;
    Ok(())
}

pub(super) fn list(dir: &Path, doc: &DocId) -> Result<Vec<VersionMeta>, StoreError> {
    let entries = match fs::read_dir(dir.join(folder(doc))) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_meta = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .is_some_and(|id| VersionId::parse(id).is_ok());
        if !is_meta {
            continue;
        }
        match fs::read(&path)
            .map_err(StoreError::from)
            .and_then(|b| VersionMeta::from_json(&b, doc))
        {
            Ok(meta) => out.push(meta),
            // One unreadable entry must not hide the others.
            Err(e) => {
                tracing::warn!(doc = %doc, path = %path.display(), error = %e, "skipping a version whose metadata cannot be read")
            }
        }
    }
    out.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(out)
}

pub(super) fn get(
    dir: &Path,
    doc: &DocId,
    id: &VersionId,
) -> Result<Option<(VersionMeta, Bytes)>, StoreError> {
    let (state_path, meta_path) = paths(dir, doc, id);
    let meta = match fs::read(&meta_path) {
        Ok(bytes) => VersionMeta::from_json(&bytes, doc)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let snapshot = decode(&fs::read(&state_path)?, doc)?;
    Ok(Some((meta, snapshot.state)))
}

pub(super) fn delete(dir: &Path, doc: &DocId, id: &VersionId) -> Result<bool, StoreError> {
    let (state_path, meta_path) = paths(dir, doc, id);
    let existed = match fs::remove_file(&meta_path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e.into()),
    };
    match fs::remove_file(&state_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    if existed {
        sync_dir(&meta_path)?;
    }
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::{Position, StreamId};

    fn meta(name: Option<&str>) -> VersionMeta {
        VersionMeta::new(
            Position::new(1, StreamId::new(5, 0)),
            name.map(String::from),
            3,
        )
    }

    #[test]
    fn versions_list_newest_first_read_back_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let doc = DocId::parse("d").expect("id");
        let (a, b) = (meta(None), meta(Some("b")));
        put(dir.path(), &doc, &a, Bytes::from_static(b"aaa")).expect("put");
        put(dir.path(), &doc, &b, Bytes::from_static(b"bbb")).expect("put");
        assert_eq!(
            list(dir.path(), &doc).expect("list"),
            vec![b.clone(), a.clone()]
        );
        let (got, state) = get(dir.path(), &doc, &a.id).expect("get").expect("some");
        assert_eq!((got, &state[..]), (a.clone(), &b"aaa"[..]));
        assert!(delete(dir.path(), &doc, &a.id).expect("delete"));
        assert!(!delete(dir.path(), &doc, &a.id).expect("delete"));
        assert_eq!(get(dir.path(), &doc, &a.id).expect("get"), None);
        assert_eq!(list(dir.path(), &doc).expect("list"), vec![b]);
    }

    #[test]
    fn a_state_without_metadata_is_no_version() {
        // A crash between the two writes leaves the state alone: not listed, not served, and
        // removed by a delete of that id.
        let dir = tempfile::tempdir().expect("tempdir");
        let doc = DocId::parse("d").expect("id");
        let m = meta(None);
        put(dir.path(), &doc, &m, Bytes::from_static(b"s")).expect("put");
        let (state_path, meta_path) = paths(dir.path(), &doc, &m.id);
        fs::remove_file(&meta_path).expect("remove");
        assert!(list(dir.path(), &doc).expect("list").is_empty());
        assert_eq!(get(dir.path(), &doc, &m.id).expect("get"), None);
        assert!(!delete(dir.path(), &doc, &m.id).expect("delete"));
        assert!(!state_path.exists());
    }
}
