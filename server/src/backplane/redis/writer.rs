//! Redis backplane, write side (data-flow step 4): queue, one EVAL per doc per group, wake-ups.

use super::Inner;
use super::conn::{Conn, query, query_op, storage};
use super::keys::{MarkSets, aw_key, log_key, meta_key};
use super::reply::{as_array, encode_origin, parse_id, parse_u64};
use super::scripts::{APPEND_LUA, script};
use crate::backplane::{BackplaneError, BackplaneResult, Chains, Origin, new_epoch};
use bytes::Bytes;
use chorus_protocol::{DocId, Position};
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Appends admitted but not yet sent. Past this, `append` answers `Overloaded` at once.
pub(super) const QUEUE_CAPACITY: usize = 16 * 1024;
/// Most operations the writer takes in one group.
const MAX_GROUP: usize = 4096;
/// Most updates in one `EVAL` (keeps one script call short; Redis is single-threaded).
const MAX_PER_EVAL: usize = 512;

pub(super) enum WriteOp {
    Append {
        doc: DocId,
        update: Bytes,
        origin: Option<Origin>,
        reply: oneshot::Sender<BackplaneResult<Position>>,
    },
    Awareness {
        doc: DocId,
        update: Bytes,
    },
}

struct DocBatch {
    doc: DocId,
    updates: Vec<(
        Bytes,
        Option<Origin>,
        oneshot::Sender<BackplaneResult<Position>>,
    )>,
}

pub(super) async fn run_writer(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriteOp>) {
    let mut chains = Chains::default();
    while let Some(first) = rx.recv().await {
        let mut group = Vec::with_capacity(64);
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        write_group(&inner, group, &mut chains).await;
    }
}

/// Writes one group: per document one EVAL with all its updates (in admission order), all
/// documents concurrently, so a group costs about one round trip however many updates it has.
/// Appends whose chain broke are refused, and a failed batch breaks its appends' chains (see
/// [`Chains`]).
async fn write_group(inner: &Arc<Inner>, group: Vec<WriteOp>, chains: &mut Chains) {
    let mut batches: Vec<DocBatch> = Vec::new();
    let mut index: HashMap<DocId, usize> = HashMap::new();
    let mut awareness: Vec<(DocId, Bytes)> = Vec::new();
    for op in group {
        match op {
            WriteOp::Append {
                doc,
                update,
                origin,
                reply,
            } => {
                if !chains.admits(&doc, origin.as_ref()) {
                    let _ = reply.send(Err(BackplaneError::EarlierAppendFailed));
                    continue;
                }
                let i = match index.get(&doc) {
                    Some(&i) if batches[i].updates.len() < MAX_PER_EVAL => i,
                    _ => {
                        batches.push(DocBatch {
                            doc: doc.clone(),
                            updates: Vec::new(),
                        });
                        index.insert(doc, batches.len() - 1);
                        batches.len() - 1
                    }
                };
                batches[i].updates.push((update, origin, reply));
            }
            WriteOp::Awareness { doc, update } => awareness.push((doc, update)),
        }
    }
    // Batches of one document that overflowed MAX_PER_EVAL must still go in order: chain
    // them in one future per document.
    let mut per_doc: HashMap<DocId, Vec<DocBatch>> = HashMap::new();
    let mut order: Vec<DocId> = Vec::new();
    for b in batches {
        if !per_doc.contains_key(&b.doc) {
            order.push(b.doc.clone());
        }
        per_doc.entry(b.doc.clone()).or_default().push(b);
    }
    let append_script = script(APPEND_LUA);
    let marks = inner
        .hooks_on
        .load(std::sync::atomic::Ordering::Acquire)
        .then(|| inner.mark_sets());
    let appends = order.into_iter().filter_map(|doc| {
        let batches = per_doc.remove(&doc)?;
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        let body = append_script.clone();
        Some(async move {
            // A later batch of the same document holds appends made after the failed ones.
            let mut broken: Vec<Origin> = Vec::new();
            for mut b in batches {
                b.refuse_chains_of(&broken);
                if let Err(origins) = append_batch(&mut conn, &body, b, marks, timeout).await {
                    broken.extend(origins);
                }
            }
            (doc, broken)
        })
    });
    let presence = awareness
        .into_iter()
        .map(|(doc, update)| publish_awareness(inner, doc, update));
    let written: Vec<DocId> = index.into_keys().collect();
    let (broken, _) = futures_util::join!(join_all(appends), join_all(presence));
    for (doc, origins) in broken {
        for o in &origins {
            chains.fail(&doc, Some(o));
        }
    }
    // After the appends returned, so a woken reader finds the entries.
    wake_shards(inner, &written).await;
}

/// One awareness update: XADD to the document's awareness stream (kept short) and a fresh
/// expiry, in one pipeline. Best-effort: a failure is only logged.
fn publish_awareness(
    inner: &Inner,
    doc: DocId,
    update: Bytes,
) -> impl std::future::Future<Output = ()> + 'static {
    let mut conn = inner.conn.clone();
    let timeout = inner.settings.timeout;
    let ttl = inner.settings.presence_ttl.as_millis() as u64;
    let node = inner.node;
    async move {
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(aw_key(&doc))
            .arg("MAXLEN")
            .arg("~")
            .arg(256)
            .arg("*")
            .arg("n")
            .arg(node.to_string())
            .arg("u")
            .arg(update.as_ref())
            .ignore()
            .cmd("PEXPIRE")
            .arg(aw_key(&doc))
            .arg(ttl.max(1000) * 2)
            .ignore();
        if let Ok(Err(e)) = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await {
            tracing::debug!(doc = %doc, error = %e, "awareness publish failed");
        }
    }
}

impl DocBatch {
    /// Answers the appends whose chain is among `broken` (an earlier batch of this document
    /// failed them) and drops them from the batch.
    fn refuse_chains_of(&mut self, broken: &[Origin]) {
        if broken.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(self.updates.len());
        for (update, origin, reply) in self.updates.drain(..) {
            let hit = origin.is_some_and(|o| {
                broken
                    .iter()
                    .any(|b| b.conn == o.conn && b.node == o.node && o.chain <= b.chain)
            });
            if hit {
                let _ = reply.send(Err(BackplaneError::EarlierAppendFailed));
            } else {
                kept.push((update, origin, reply));
            }
        }
        self.updates = kept;
    }
}

/// Sends one batch. On failure answers every append in it with the error and returns their
/// origins (their chains are broken). With `marks`, the script also marks the document as
/// having undelivered webhooks.
async fn append_batch(
    conn: &mut Conn,
    body: &str,
    batch: DocBatch,
    marks: Option<MarkSets>,
    timeout: Duration,
) -> Result<(), Vec<Origin>> {
    if batch.updates.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(body)
        .arg(if marks.is_some() { 3 } else { 2 })
        .arg(meta_key(&batch.doc))
        .arg(log_key(&batch.doc));
    if let Some(sets) = marks {
        cmd.arg(sets.key(&batch.doc));
    }
    cmd.arg(new_epoch());
    for (update, origin, _) in &batch.updates {
        cmd.arg(update.as_ref()).arg(encode_origin(*origin));
    }
    let result = query(conn, &cmd, timeout).await.and_then(|v| {
        let parts = as_array(v)?;
        let epoch = parse_u64(parts.first())?;
        let ids = parts[1..]
            .iter()
            .map(|v| parse_id(Some(v)))
            .collect::<BackplaneResult<Vec<_>>>()?;
        if ids.len() != batch.updates.len() {
            return Err(storage("append script answered a different number of ids"));
        }
        Ok((epoch, ids))
    });
    match result {
        Ok((epoch, ids)) => {
            for ((_, _, reply), id) in batch.updates.into_iter().zip(ids) {
                let _ = reply.send(Ok(Position::new(epoch, id)));
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(doc = %batch.doc, error = %e, "append to redis failed; nothing in this batch is acknowledged");
            let msg = e.to_string();
            let mut origins = Vec::new();
            for (_, origin, reply) in batch.updates {
                let _ = reply.send(Err(BackplaneError::Storage(msg.clone())));
                origins.extend(origin);
            }
            Err(origins)
        }
    }
}

/// Cluster mode: tells the shard readers of the written documents to look (one XADD per
/// shard per group). Standalone readers block on the document streams themselves.
pub(super) async fn wake_shards(inner: &Arc<Inner>, docs: &[DocId]) {
    if !inner.settings.cluster || docs.is_empty() {
        return;
    }
    let topology = inner.topology();
    let mut by_shard: HashMap<usize, Vec<&DocId>> = HashMap::new();
    for d in docs {
        by_shard.entry(topology.shard(d)).or_default().push(d);
    }
    let timeout = inner.settings.timeout;
    join_all(by_shard.into_iter().map(|(shard, docs)| {
        let mut conn = inner.conn.clone();
        let key = topology.wake_keys[shard].clone();
        let names = docs
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        async move {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(key)
                .arg("MAXLEN")
                .arg("~")
                .arg(1024)
                .arg("*")
                .arg("d")
                .arg(&names);
            // Not retried: every shard reader reads all its documents at least every BLOCK,
            // wake-ups or not, so these documents are read within about a second anyway (and
            // a retry would hold up the writer's next group while Redis is struggling).
            if let Err(e) = query_op(&mut conn, &cmd, timeout, "wake").await {
                tracing::warn!(shard, docs = %names, error = %e, "wake-up not written; the shard reader's timed full read picks these documents up");
            }
        }
    }))
    .await;
}
