//! Webhook state in the log's store (beside data-flow step 4): which documents have changes not
//! yet delivered, each URL's last delivered position, and the one-sender-per-document lease.
//!
//! The "undelivered" mark is set by the log itself, atomically with (Redis: inside the append
//! script) or derived from (embedded: written by the checkpoint that copies the write-ahead
//! entries into redb, and re-derived by replaying segments after a crash) the durable append,
//! so no crash between an acknowledged append and its webhook can lose the webhook. It is
//! cleared only by [`WebhookStore::clear_if_head`], which compares with the log's head in the
//! same atomic step: an append that raced with the delivery keeps the mark.

use super::BackplaneResult;
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::future::BoxFuture;
use std::time::Duration;

/// Where a scan of the marked documents continues (`None`: from the start / it is done).
pub type ScanCursor = Option<String>;

pub trait WebhookStore: Send + Sync + 'static {
    /// Up to about `limit` marked documents after `from`, and where the next batch starts
    /// (`None` once the scan is complete).
    fn marked(
        &self,
        from: ScanCursor,
        limit: usize,
    ) -> BoxFuture<'static, BackplaneResult<(Vec<DocId>, ScanCursor)>>;

    /// The last position delivered to `url` for `doc` (`None`: never delivered).
    fn cursor(
        &self,
        doc: &DocId,
        url: &str,
    ) -> BoxFuture<'static, BackplaneResult<Option<Position>>>;

    /// Records that everything up to `to` was delivered to `url`.
    fn set_cursor(
        &self,
        doc: &DocId,
        url: &str,
        to: Position,
    ) -> BoxFuture<'static, BackplaneResult<()>>;

    /// Clears `doc`'s mark if its log's head is still (`epoch`, `last`); whether it did.
    fn clear_if_head(
        &self,
        doc: &DocId,
        epoch: u64,
        last: StreamId,
    ) -> BoxFuture<'static, BackplaneResult<bool>>;

    /// Takes, or renews if this node holds it, `doc`'s sending lease for `ttl`.
    fn lease(&self, doc: &DocId, ttl: Duration) -> BoxFuture<'static, BackplaneResult<bool>>;

    /// Gives the lease back (if this node still holds it).
    fn release(&self, doc: &DocId) -> BoxFuture<'static, ()>;
}
