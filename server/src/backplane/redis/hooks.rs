//! Redis backplane, webhook side (beside data-flow step 4): undelivered marks, delivered cursors, the sending lease.
//!
//! The mark is set by the append script itself (one atomic call with the entries), so an
//! acknowledged append is always marked. Where the marks live ([`MarkSets`]):
//!
//! - Standalone Redis: one set, read with `SSCAN` in batches.
//! - Redis Cluster: a script may only write keys of one slot, so each hash slot has its own
//!   set, `chorus:{TAG}:undelivered` with TAG a number hashing to that slot; a document's mark
//!   goes in its slot's set, in the same append (and compare-and-clear) script as its log.
//!
//! Scanning a cluster's 16384 sets without walking the keyspace: the scan cursor is a slot
//! (and an `SSCAN` cursor inside it). A probe is one `EVAL` of [`PROBE_MARKS_LUA`] on the
//! master owning a run of at most [`PROBE_SLOTS`] slots (Redis ≥ 7 lets one script read
//! several slots of its own node): it `SCARD`s each slot's set and returns the members of the
//! non-empty ones up to the batch size; a slot holding more than a batch is read with `SSCAN`.
//! Redis work per full scan of one node (every `SCAN_EVERY`, 2 s): with nothing marked,
//! about 16384 / [`PROBE_SLOTS`] + masters `EVAL`s (19 for three masters), 16384 O(1)
//! `SCARD`s in all, spread over the masters: about 16 ms of Redis time per scan, under 1 % of
//! one Redis core per Chorus node; with M marked documents, about M / batch more round trips,
//! each returning at most a batch. If slots moved since this node read the slot
//! map (MOVED, ASK, cross-slot errors during a reshard), the probe fails, the map is re-read,
//! and the next scan retries: a scan only finds work, it never loses marks.

use super::Inner;
use super::conn::{query, storage};
use super::keys::{
    HASH_SLOTS, HOOK_MARKS_KEY, MarkSets, hook_cursors_key, hook_lease_key, log_key, meta_key,
    slot_marks_key, slot_tag,
};
use super::reply::{as_array, as_string, as_u64};
use super::scripts::{CLEAR_MARK_LUA, LEASE_LUA, PROBE_MARKS_LUA, UNLOCK_LUA, script};
use crate::backplane::webhook_store::{ScanCursor, WebhookStore};
use crate::backplane::{BackplaneError, BackplaneResult};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Slots one cluster probe covers at most: bounds one script's work (this many O(1) `SCARD`s:
/// about 1 ms of Redis time, measured on Redis 7.0 with empty sets) and its arguments (this
/// many tags of at most 6 bytes).
const PROBE_SLOTS: u16 = 1024;

pub(super) fn enable(inner: &Arc<Inner>) -> BackplaneResult<Arc<dyn WebhookStore>> {
    inner.hooks_on.store(true, Ordering::Release);
    Ok(Arc::new(RedisHooks {
        inner: inner.clone(),
    }))
}

/// On a cluster, runs the scan's probe once on every master before the node serves: the probe
/// needs Redis 7.0 or later (script flags), and a cluster with an older master must refuse
/// webhooks at start rather than fail every scan afterwards (its dead senders' documents would
/// never be taken over).
pub(super) async fn check(inner: &Arc<Inner>) -> BackplaneResult<()> {
    if !inner.settings.cluster {
        return Ok(());
    }
    let hooks = RedisHooks {
        inner: inner.clone(),
    };
    let mut slot = 0;
    while slot < HASH_SLOTS {
        let end = inner.topology().same_master_until(slot, HASH_SLOTS);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PROBE_MARKS_LUA)
            .arg(1)
            .arg(slot_marks_key(slot))
            .arg(1);
        hooks.run(cmd).await.map_err(|e| {
            BackplaneError::Storage(format!(
                "change webhooks on Redis Cluster need Redis 7.0 or later on every master; \
                 the probe of slot {slot} failed: {e}"
            ))
        })?;
        slot = end.max(slot + 1);
    }
    Ok(())
}

#[derive(Clone)]
struct RedisHooks {
    inner: Arc<Inner>,
}

impl RedisHooks {
    fn run(&self, cmd: redis::Cmd) -> BoxFuture<'static, BackplaneResult<redis::Value>> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.settings.timeout;
        async move { query(&mut conn, &cmd, timeout).await }.boxed()
    }

    /// One `SSCAN` batch of `key` from `cursor`: the documents and the next cursor (`None`
    /// once the set is done).
    fn sscan(
        &self,
        key: String,
        cursor: &str,
        limit: usize,
    ) -> BoxFuture<'static, BackplaneResult<(Vec<DocId>, Option<String>)>> {
        let mut cmd = redis::cmd("SSCAN");
        cmd.arg(key).arg(cursor).arg("COUNT").arg(limit);
        let reply = self.run(cmd);
        async move {
            let parts = as_array(reply.await?)?;
            let next = as_string(parts.first()).filter(|c| c != "0");
            let members = match parts.into_iter().nth(1) {
                Some(v) => as_array(v)?,
                None => Vec::new(),
            };
            Ok((docs_of(&members), next))
        }
        .boxed()
    }

    /// A cluster scan step from `from` (see the module doc): `SSCAN` inside a big slot, or a
    /// probe of the next run of slots on one master.
    async fn marked_in_slots(
        &self,
        from: SlotCursor,
        limit: usize,
    ) -> BackplaneResult<(Vec<DocId>, ScanCursor)> {
        // SSCAN refuses COUNT 0, and a zero budget would make every set "big".
        let limit = limit.max(1);
        if let Some(inside) = &from.inside {
            return self.sscan_slot(from.slot, inside, limit).await;
        }
        let end = self
            .inner
            .topology()
            .same_master_until(from.slot, PROBE_SLOTS);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PROBE_MARKS_LUA)
            .arg(1)
            .arg(slot_marks_key(from.slot))
            .arg(limit);
        for slot in from.slot + 1..end {
            cmd.arg(slot_tag(slot));
        }
        let reply = match self.run(cmd).await {
            Ok(v) => as_array(v)?,
            Err(e) => {
                // Most likely the slots moved: read the map again before the next scan.
                self.inner.topology_stale.notify_one();
                return Err(e);
            }
        };
        let done = as_u64(reply.first()).ok_or_else(|| storage("unexpected probe reply"))?;
        let done = done.min(u64::from(end - from.slot)) as u16;
        if as_u64(reply.get(1)) == Some(1) && from.slot + done < end {
            return self.sscan_slot(from.slot + done, "0", limit).await;
        }
        // The script reads at least one set unless it answers "big"; the floor keeps a scan
        // moving whatever the reply, so it cannot loop on one slot.
        let at = from.slot + done.max(1);
        let members = match reply.into_iter().nth(2) {
            Some(v) => as_array(v)?,
            None => Vec::new(),
        };
        Ok((docs_of(&members), SlotCursor::at(at)))
    }

    async fn sscan_slot(
        &self,
        slot: u16,
        cursor: &str,
        limit: usize,
    ) -> BackplaneResult<(Vec<DocId>, ScanCursor)> {
        let (docs, next) = self.sscan(slot_marks_key(slot), cursor, limit).await?;
        let next = match next {
            Some(inside) => SlotCursor {
                slot,
                inside: Some(inside),
            }
            .encode(),
            None => SlotCursor::at(slot + 1),
        };
        Ok((docs, next))
    }
}

fn docs_of(members: &[redis::Value]) -> Vec<DocId> {
    members
        .iter()
        .filter_map(|m| as_string(Some(m)))
        .filter_map(|s| DocId::parse(&s).ok())
        .collect()
}

/// Where a cluster scan stands: the next slot, and inside it an `SSCAN` cursor if that slot's
/// set was too big for one batch. Encoded as `SLOT` or `SLOT:CURSOR`.
#[derive(Debug, PartialEq, Eq)]
struct SlotCursor {
    slot: u16,
    inside: Option<String>,
}

impl SlotCursor {
    /// The scan cursor for "continue at `slot`" (`None`: past the last slot, done).
    fn at(slot: u16) -> ScanCursor {
        (slot < HASH_SLOTS).then(|| slot.to_string())
    }

    fn encode(&self) -> ScanCursor {
        Some(match &self.inside {
            Some(c) => format!("{}:{c}", self.slot),
            None => self.slot.to_string(),
        })
    }

    /// A cursor this module wrote; anything else (or none) starts at slot 0.
    fn decode(from: &ScanCursor) -> Self {
        let Some(text) = from else {
            return SlotCursor {
                slot: 0,
                inside: None,
            };
        };
        let (slot, inside) = match text.split_once(':') {
            Some((s, c)) => (s, Some(c.to_owned())),
            None => (text.as_str(), None),
        };
        match slot.parse::<u16>() {
            Ok(slot) if slot < HASH_SLOTS => SlotCursor { slot, inside },
            _ => SlotCursor {
                slot: 0,
                inside: None,
            },
        }
    }
}

impl WebhookStore for RedisHooks {
    fn marked(
        &self,
        from: ScanCursor,
        limit: usize,
    ) -> BoxFuture<'static, BackplaneResult<(Vec<DocId>, ScanCursor)>> {
        match self.inner.mark_sets() {
            MarkSets::Global => self.sscan(
                HOOK_MARKS_KEY.to_owned(),
                from.as_deref().unwrap_or("0"),
                limit,
            ),
            MarkSets::PerSlot => {
                let this = self.clone();
                async move { this.marked_in_slots(SlotCursor::decode(&from), limit).await }.boxed()
            }
        }
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
            .arg(self.inner.mark_sets().key(doc))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_cursors_round_trip_and_garbage_starts_over() {
        for c in [
            SlotCursor {
                slot: 0,
                inside: None,
            },
            SlotCursor {
                slot: 16383,
                inside: Some("1234".into()),
            },
        ] {
            assert_eq!(SlotCursor::decode(&c.encode()), c);
        }
        assert_eq!(SlotCursor::at(HASH_SLOTS), None);
        assert_eq!(SlotCursor::decode(&SlotCursor::at(7)).slot, 7);
        for bad in ["x", "16384", "-1:2", ""] {
            assert_eq!(
                SlotCursor::decode(&Some(bad.into())),
                SlotCursor::decode(&None)
            );
        }
    }
}
