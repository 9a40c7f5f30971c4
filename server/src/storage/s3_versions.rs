//! Versions in the S3 store: `PREFIX/.versions/DOC/ID.{state,json}` (see [`super::versions`]).
//! A listing is one LIST of the folder and a GET of each small `.json`, never of a state.

use super::Snapshot;
use super::StoreError;
use super::fs::{decode, encode};
use super::versions::{VersionId, VersionMeta, folder};
use bytes::Bytes;
use chorus_protocol::DocId;
use futures_util::StreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Metadata objects fetched at once while listing.
const LIST_FETCHES: usize = 8;

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(std::io::Error::other(e.to_string()))
}

fn folder_path(prefix: &str, doc: &DocId) -> Path {
    if prefix.is_empty() {
        Path::from(folder(doc))
    } else {
        Path::from(format!("{prefix}/{}", folder(doc)))
    }
}

fn paths(prefix: &str, doc: &DocId, id: &VersionId) -> (Path, Path) {
    let dir = folder_path(prefix, doc);
    (
        dir.clone().join(format!("{id}.state")),
        dir.join(format!("{id}.json")),
    )
}

async fn get_bytes(store: &AmazonS3, location: &Path) -> Result<Option<Bytes>, StoreError> {
    match store.get(location).await {
        Ok(got) => got.bytes().await.map(Some).map_err(io),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

pub(super) async fn put(
    store: &AmazonS3,
    prefix: &str,
    doc: &DocId,
    meta: VersionMeta,
    state: Bytes,
) -> Result<(), StoreError> {
    let (state_path, meta_path) = paths(prefix, doc, &meta.id);
    let snapshot = Snapshot {
        position: meta.position,
        state,
    };
    store
        .put(&state_path, PutPayload::from(encode(&snapshot)))
        .await
        .map_err(io)?;
    // The metadata last: a version is listed only once its state is stored.
    store
        .put(&meta_path, PutPayload::from(meta.to_json()))
        .await
        .map_err(io)?;
    Ok(())
}

pub(super) async fn list(
    store: &AmazonS3,
    prefix: &str,
    doc: &DocId,
) -> Result<Vec<VersionMeta>, StoreError> {
    let mut metas = Vec::new();
    let mut listing = store.list(Some(&folder_path(prefix, doc)));
    while let Some(object) = listing.next().await {
        let object = object.map_err(io)?;
        let is_meta = object
            .location
            .filename()
            .and_then(|n| n.strip_suffix(".json"))
            .is_some_and(|id| VersionId::parse(id).is_ok());
        if is_meta {
            metas.push(object.location);
        }
    }
    let fetched: Vec<Result<Option<Bytes>, StoreError>> = futures_util::stream::iter(metas)
        .map(|location| async move { get_bytes(store, &location).await })
        .buffer_unordered(LIST_FETCHES)
        .collect()
        .await;
    let mut out = Vec::new();
    for bytes in fetched {
        // Deleted between the LIST and the GET: not a version any more.
        let Some(bytes) = bytes? else { continue };
        match VersionMeta::from_json(&bytes, doc) {
            Ok(meta) => out.push(meta),
            Err(e) => {
                tracing::warn!(doc = %doc, error = %e, "skipping a version whose metadata cannot be read")
            }
        }
    }
    out.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(out)
}

pub(super) async fn get(
    store: &AmazonS3,
    prefix: &str,
    doc: &DocId,
    id: &VersionId,
) -> Result<Option<(VersionMeta, Bytes)>, StoreError> {
    let (state_path, meta_path) = paths(prefix, doc, id);
    let Some(meta) = get_bytes(store, &meta_path).await? else {
        return Ok(None);
    };
    let meta = VersionMeta::from_json(&meta, doc)?;
    let Some(state) = get_bytes(store, &state_path).await? else {
        return Err(StoreError::Corrupt {
            doc: doc.to_string(),
            why: "version metadata without its state",
        });
    };
    Ok(Some((meta, decode(&state, doc)?.state)))
}

pub(super) async fn delete(
    store: &AmazonS3,
    prefix: &str,
    doc: &DocId,
    id: &VersionId,
) -> Result<bool, StoreError> {
    let (state_path, meta_path) = paths(prefix, doc, id);
    // S3 deletes answer success for missing keys: existence is asked first.
    let existed = match store.head(&meta_path).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => return Err(io(e)),
    };
    for location in [&meta_path, &state_path] {
        match store.delete(location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(existed)
}
