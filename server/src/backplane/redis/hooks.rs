//! Redis backplane, webhook side (beside data-flow step 4): undelivered marks, delivered cursors, the sending lease.
//!
//! The mark is set by the append script itself (one atomic call with the entries), so an
//! acknowledged append is always marked; the marks live in one set (`SSCAN` in batches), which
//! is why webhooks need a standalone Redis: in a cluster that set would sit in another slot
//! than the document's keys and could not be written in the same script.

use super::conn::query;
use super::keys::{HOOK_MARKS_KEY, hook_cursors_key, hook_lease_key, log_key, meta_key};
use super::reply::{as_array, as_string, as_u64};
use super::scripts::{CLEAR_MARK_LUA, LEASE_LUA, UNLOCK_LUA, script};
use super::{Client, Inner};
use crate::backplane::webhook_store::{ScanCursor, WebhookStore};
use crate::backplane::{BackplaneError, BackplaneResult};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(super) fn enable(inner: &Arc<Inner>) -> BackplaneResult<Arc<dyn WebhookStore>> {
    if matches!(inner.client, Client::Cluster(_)) {
        return Err(BackplaneError::Unsupported(
            "change webhooks on Redis Cluster",
        ));
    }
    inner.hooks_on.store(true, Ordering::Release);
    Ok(Arc::new(RedisHooks {
        inner: inner.clone(),
    }))
}

struct RedisHooks {
    inner: Arc<Inner>,
}

impl RedisHooks {
    fn run(&self, cmd: redis::Cmd) -> BoxFuture<'static, BackplaneResult<redis::Value>> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        async move { query(&mut conn, &cmd, timeout).await }.boxed()
    }
}

impl WebhookStore for RedisHooks {
    fn marked(
        &self,
        from: ScanCursor,
        limit: usize,
    ) -> BoxFuture<'static, BackplaneResult<(Vec<DocId>, ScanCursor)>> {
        let mut cmd = redis::cmd("SSCAN");
        cmd.arg(HOOK_MARKS_KEY)
            .arg(from.as_deref().unwrap_or("0"))
            .arg("COUNT")
            .arg(limit);
        let reply = self.run(cmd);
        async move {
            let parts = as_array(reply.await?)?;
            let next = as_string(parts.first()).filter(|c| c != "0");
            let members = match parts.into_iter().nth(1) {
                Some(v) => as_array(v)?,
                None => Vec::new(),
            };
            let docs = members
                .iter()
                .filter_map(|m| as_string(Some(m)))
                .filter_map(|s| DocId::parse(&s).ok())
                .collect();
            Ok((docs, next))
        }
        .boxed()
    }

    fn cursor(
        &self,
        doc: &DocId,
        url: &str,
    ) -> BoxFuture<'static, BackplaneResult<Option<Position>>> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(hook_cursors_key(doc)).arg(url);
        let reply = self.run(cmd);
        async move {
            let v = reply.await?;
            // A value that does not parse (written by hand?) counts as never delivered.
            Ok(as_string(Some(&v)).and_then(|s| s.parse().ok()))
        }
        .boxed()
    }

    fn set_cursor(
        &self,
        doc: &DocId,
        url: &str,
        to: Position,
    ) -> BoxFuture<'static, BackplaneResult<()>> {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(hook_cursors_key(doc)).arg(url).arg(to.to_string());
        let reply = self.run(cmd);
        async move { reply.await.map(|_| ()) }.boxed()
    }

    fn clear_if_head(
        &self,
        doc: &DocId,
        epoch: u64,
        last: StreamId,
    ) -> BoxFuture<'static, BackplaneResult<bool>> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script(CLEAR_MARK_LUA))
            .arg(3)
            .arg(meta_key(doc))
            .arg(log_key(doc))
            .arg(HOOK_MARKS_KEY)
            .arg(epoch.to_string())
            .arg(last.to_string());
        let reply = self.run(cmd);
        async move { Ok(as_u64(Some(&reply.await?)) == Some(1)) }.boxed()
    }

    fn lease(&self, doc: &DocId, ttl: Duration) -> BoxFuture<'static, BackplaneResult<bool>> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEASE_LUA)
            .arg(1)
            .arg(hook_lease_key(doc))
            .arg(self.inner.node.to_string())
            .arg(ttl.as_millis().max(1) as u64);
        let reply = self.run(cmd);
        async move { Ok(as_u64(Some(&reply.await?)) == Some(1)) }.boxed()
    }

    fn release(&self, doc: &DocId) -> BoxFuture<'static, ()> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(UNLOCK_LUA)
            .arg(1)
            .arg(hook_lease_key(doc))
            .arg(self.inner.node.to_string());
        let reply = self.run(cmd);
        async move {
            // If this fails the lease simply expires.
            let _ = reply.await;
        }
        .boxed()
    }
}
