//! Embedded log, webhook side (beside data-flow step 4): undelivered marks and delivered cursors in redb.
//!
//! The mark is derived from the durable append rather than written before it: the checkpoint
//! that copies a write-ahead segment into redb marks the documents it wrote in the same
//! transaction, and a crash before that checkpoint leaves the segment, whose replay at open
//! lists its documents, marked when webhooks are turned on. So an acknowledged append always
//! ends up marked at no cost on the append path; for the ~1 s before its checkpoint the
//! running node knows the document from its own write door instead.

use super::shared::Shared;
use super::store::{META, head_from};
use super::{EmbeddedBackplane, lock, storage};
use crate::backplane::BackplaneResult;
use crate::backplane::webhook_store::{ScanCursor, WebhookStore};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// doc → 1: the document has changes some webhook URL has not been sent.
const MARKS: TableDefinition<&str, u8> = TableDefinition::new("hook_marks");
/// (doc, url) → (epoch, ms, seq) delivered.
const CURSORS: TableDefinition<(&str, &str), (u64, u64, u64)> =
    TableDefinition::new("hook_cursors");

/// Marks `docs` in a write transaction (the checkpoint's own, or the one at start).
pub(super) fn mark<'a>(
    txn: &redb::WriteTransaction,
    docs: impl Iterator<Item = &'a DocId>,
) -> BackplaneResult<()> {
    let mut marks = txn.open_table(MARKS).map_err(storage)?;
    for doc in docs {
        marks.insert(doc.as_str(), 1).map_err(storage)?;
    }
    Ok(())
}

impl EmbeddedBackplane {
    /// Turns marking on (before any append) and marks what the replay at open wrote.
    pub(super) fn enable_hooks(&self) -> BackplaneResult<Arc<dyn WebhookStore>> {
        let shared = &self.shared;
        shared.hooks_on.store(true, Ordering::Release);
        let replayed = std::mem::take(&mut *lock(&shared.replayed));
        let txn = shared.db.begin_write().map_err(storage)?;
        mark(&txn, replayed.iter())?;
        txn.open_table(CURSORS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(Arc::new(EmbeddedHooks {
            shared: shared.clone(),
            tracker: self.tracker.clone(),
        }))
    }
}

struct EmbeddedHooks {
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl EmbeddedHooks {
    /// Runs a redb call on the blocking pool (it may fsync).
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> BackplaneResult<T> + Send + 'static,
    ) -> BoxFuture<'static, BackplaneResult<T>> {
        let shared = self.shared.clone();
        let task = self.tracker.spawn_blocking(move || f(&shared));
        async move { task.await.map_err(storage)? }.boxed()
    }
}

impl WebhookStore for EmbeddedHooks {
    fn marked(
        &self,
        from: ScanCursor,
        limit: usize,
    ) -> BoxFuture<'static, BackplaneResult<(Vec<DocId>, ScanCursor)>> {
        self.blocking(move |shared| {
            let txn = shared.db.begin_read().map_err(storage)?;
            let marks = txn.open_table(MARKS).map_err(storage)?;
            let rows = match &from {
                Some(after) => marks.range::<&str>((
                    std::ops::Bound::Excluded(after.as_str()),
                    std::ops::Bound::Unbounded,
                )),
                None => marks.range::<&str>(..),
            }
            .map_err(storage)?;
            let mut docs = Vec::new();
            let mut last = None;
            for row in rows.take(limit) {
                let (k, _) = row.map_err(storage)?;
                let key = k.value().to_string();
                // A row written by this code always parses; skip anything else.
                if let Ok(doc) = DocId::parse(&key) {
                    docs.push(doc);
                }
                last = Some(key);
            }
            let next = if docs.len() < limit { None } else { last };
            Ok((docs, next))
        })
    }

    fn cursor(
        &self,
        doc: &DocId,
        url: &str,
    ) -> BoxFuture<'static, BackplaneResult<Option<Position>>> {
        let (doc, url) = (doc.clone(), url.to_string());
        self.blocking(move |shared| {
            let txn = shared.db.begin_read().map_err(storage)?;
            let cursors = txn.open_table(CURSORS).map_err(storage)?;
            Ok(cursors
                .get((doc.as_str(), url.as_str()))
                .map_err(storage)?
                .map(|v| Position::from(v.value())))
        })
    }

    fn set_cursor(
        &self,
        doc: &DocId,
        url: &str,
        to: Position,
    ) -> BoxFuture<'static, BackplaneResult<()>> {
        let (doc, url) = (doc.clone(), url.to_string());
        self.blocking(move |shared| {
            let txn = shared.db.begin_write().map_err(storage)?;
            txn.open_table(CURSORS)
                .map_err(storage)?
                .insert((doc.as_str(), url.as_str()), <(u64, u64, u64)>::from(to))
                .map_err(storage)?;
            txn.commit().map_err(storage)
        })
    }

    fn clear_if_head(
        &self,
        doc: &DocId,
        epoch: u64,
        last: StreamId,
    ) -> BoxFuture<'static, BackplaneResult<bool>> {
        let doc = doc.clone();
        self.blocking(move |shared| {
            // redb has one writer at a time, so no checkpoint commits between the head read
            // here and this commit; an append not in the pending set yet is not acknowledged
            // yet, and its checkpoint marks the document again.
            let txn = shared.db.begin_write().map_err(storage)?;
            let head = {
                let pending = lock(&shared.pending).docs.get(&doc).map(|d| d.head);
                match pending {
                    Some(h) => Some(h),
                    None => txn
                        .open_table(META)
                        .map_err(storage)?
                        .get(doc.as_str())
                        .map_err(storage)?
                        .map(|v| head_from(v.value())),
                }
            };
            let (cur_epoch, cur_last) = head.map_or((0, StreamId::ZERO), |h| (h.epoch, h.last));
            if (cur_epoch, cur_last) != (epoch, last) {
                return Ok(false);
            }
            txn.open_table(MARKS)
                .map_err(storage)?
                .remove(doc.as_str())
                .map_err(storage)?;
            txn.commit().map_err(storage)?;
            Ok(true)
        })
    }

    /// One node: nobody to compete with.
    fn lease(&self, _doc: &DocId, _ttl: Duration) -> BoxFuture<'static, BackplaneResult<bool>> {
        Box::pin(async { Ok(true) })
    }

    fn release(&self, _doc: &DocId) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}
