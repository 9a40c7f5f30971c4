//! Snapshots in an S3-compatible object store (`--snapshot-store s3://bucket/prefix`), shared
//! by every node, through the `object_store` crate.
//!
//! Objects are immutable: each snapshot gets its own key, `PREFIX/DOC/EPOCH-MS-SEQ.snap`
//! (fixed-width hex and decimal, so names sort by position within an epoch), in the same
//! checksummed format as the filesystem store. Nothing is ever overwritten, so a slow node can
//! never replace a newer snapshot with an older one; a load picks, within the epoch of the
//! most recently written object, the highest position. After a successful write, older
//! snapshots of the same epoch are deleted; a crash before that only leaves garbage that the
//! next save removes.

use super::fs::{decode, encode};
use super::s3_versions;
use super::versions::{VersionId, VersionMeta};
use super::{Snapshot, SnapshotStore, StoreError};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

pub struct S3SnapshotStore {
    store: Arc<AmazonS3>,
    prefix: Arc<String>,
}

fn io<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Io(std::io::Error::other(e.to_string()))
}

impl S3SnapshotStore {
    /// `url` is `s3://bucket[/prefix]`. Endpoint, region and credentials come from the usual
    /// `AWS_*` environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`; `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        Self::from_url_with(url, &[])
    }

    /// Like [`S3SnapshotStore::from_url`], with `object_store` options (e.g. `aws_endpoint`,
    /// `aws_allow_http`) that override the environment.
    pub fn from_url_with(url: &str, options: &[(&str, &str)]) -> Result<Self, StoreError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| io(format!("not an s3:// url: {url}")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(io("s3 url without a bucket"));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (k, v) in options {
            builder = builder.with_config(k.parse().map_err(io)?, *v);
        }
        let store = builder.build().map_err(io)?;
        Ok(S3SnapshotStore {
            store: Arc::new(store),
            prefix: Arc::new(prefix.trim_matches('/').to_string()),
        })
    }

    fn dir(prefix: &str, doc: &DocId) -> Path {
        if prefix.is_empty() {
            Path::from(doc.as_str())
        } else {
            Path::from(format!("{prefix}/{doc}"))
        }
    }
}

fn key_name(p: Position) -> String {
    format!("{:016x}-{:020}-{:020}.snap", p.epoch, p.id.ms, p.id.seq)
}

fn parse_name(meta: &ObjectMeta) -> Option<Position> {
    let name = meta.location.filename()?.strip_suffix(".snap")?;
    let mut parts = name.split('-');
    let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
    let ms = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some(Position::new(epoch, StreamId::new(ms, seq)))
}

async fn list(store: &AmazonS3, dir: &Path) -> Result<Vec<(ObjectMeta, Position)>, StoreError> {
    let mut out = Vec::new();
    let mut stream = store.list(Some(dir));
    while let Some(meta) = stream.next().await {
        let meta = meta.map_err(io)?;
        if let Some(p) = parse_name(&meta) {
            out.push((meta, p));
        }
    }
    Ok(out)
}

/// The snapshot to load: the highest position within the epoch of the newest object.
fn pick(objects: &[(ObjectMeta, Position)]) -> Option<&(ObjectMeta, Position)> {
    let newest = objects.iter().max_by_key(|(m, _)| m.last_modified)?;
    let epoch = newest.1.epoch;
    objects
        .iter()
        .filter(|(_, p)| p.epoch == epoch)
        .max_by_key(|(_, p)| p.id)
}

impl SnapshotStore for S3SnapshotStore {
    fn load(&self, doc: &DocId) -> BoxFuture<'static, Result<Option<Snapshot>, StoreError>> {
        let (store, prefix, doc) = (self.store.clone(), self.prefix.clone(), doc.clone());
        async move {
            let objects = list(&store, &Self::dir(&prefix, &doc)).await?;
            let Some((meta, _)) = pick(&objects) else {
                return Ok(None);
            };
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(io)?
                .bytes()
                .await
                .map_err(io)?;
            decode(&bytes, &doc).map(Some)
        }
        .boxed()
    }

    fn save(
        &self,
        doc: &DocId,
        snapshot: Snapshot,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (store, prefix, doc) = (self.store.clone(), self.prefix.clone(), doc.clone());
        async move {
            let dir = Self::dir(&prefix, &doc);
            let before = list(&store, &dir).await?;
            let p = snapshot.position;
            if before
                .iter()
                .any(|(_, q)| q.epoch == p.epoch && q.id >= p.id)
            {
                return Ok(false);
            }
            let location = dir.clone().join(key_name(p));
            store
                .put(&location, PutPayload::from(encode(&snapshot)))
                .await
                .map_err(io)?;
            // Garbage: older snapshots of this epoch. Other epochs' objects stay (one each at
            // most): this writer cannot tell whether its epoch or theirs is the current one.
            for (meta, q) in before {
                if q.epoch == p.epoch && q.id < p.id {
                    let _ = store.delete(&meta.location).await;
                }
            }
            Ok(true)
        }
        .boxed()
    }

    fn put_version(
        &self,
        doc: &DocId,
        meta: VersionMeta,
        state: bytes::Bytes,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let (store, prefix, doc) = (self.store.clone(), self.prefix.clone(), doc.clone());
        async move { s3_versions::put(&store, &prefix, &doc, meta, state).await }.boxed()
    }

    fn list_versions(
        &self,
        doc: &DocId,
    ) -> BoxFuture<'static, Result<Vec<VersionMeta>, StoreError>> {
        let (store, prefix, doc) = (self.store.clone(), self.prefix.clone(), doc.clone());
        async move { s3_versions::list(&store, &prefix, &doc).await }.boxed()
    }

    fn get_version(
        &self,
        doc: &DocId,
        id: &VersionId,
    ) -> BoxFuture<'static, Result<Option<(VersionMeta, bytes::Bytes)>, StoreError>> {
        let (store, prefix, doc, id) = (
            self.store.clone(),
            self.prefix.clone(),
            doc.clone(),
            id.clone(),
        );
        async move { s3_versions::get(&store, &prefix, &doc, &id).await }.boxed()
    }

    fn delete_version(
        &self,
        doc: &DocId,
        id: &VersionId,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (store, prefix, doc, id) = (
            self.store.clone(),
            self.prefix.clone(),
            doc.clone(),
            id.clone(),
        );
        async move { s3_versions::delete(&store, &prefix, &doc, &id).await }.boxed()
    }
}
