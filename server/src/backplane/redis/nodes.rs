//! Redis backplane, node tasks (beside step 5): the waker for new watches, and the heartbeat.

use super::Inner;
use super::conn::{count, lock, query};
use super::keys::{ctl_key, node_key};
use super::writer::wake_shards;
use chorus_protocol::DocId;
use futures_util::future::join_all;
use redis::Value;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Turns "the watched set changed" into a wake-up of the blocking reader that must now read
/// more streams: an XADD to this node's control stream (standalone) or to the shard's wake
/// stream (cluster), both of which the reader's blocking XREAD includes.
pub(super) async fn run_waker(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = inner.watch_changed.notified() => {}
        }
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        if inner.settings.cluster {
            let docs: Vec<DocId> = lock(&inner.watched).fresh.iter().cloned().collect();
            wake_shards(&inner, &docs).await;
        } else {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(ctl_key(inner.node))
                .arg("MAXLEN")
                .arg("~")
                .arg(16)
                .arg("*")
                .arg("w")
                .arg(1);
            let mut pipe = redis::pipe();
            pipe.add_command(cmd)
                .ignore()
                .cmd("PEXPIRE")
                .arg(ctl_key(inner.node))
                .arg(60_000)
                .ignore();
            // If Redis is down the reader is reconnecting anyway and reads everything watched.
            count(2);
            let _ = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
        }
    }
}

/// Keeps this node's heartbeat key alive and reports remote nodes whose key expired, so their
/// clients' presence disappears everywhere within about `presence_ttl`.
pub(super) async fn run_heartbeat(inner: Arc<Inner>) {
    let ttl = inner.settings.presence_ttl.max(Duration::from_millis(300));
    let period = ttl / 3;
    loop {
        let mut conn = inner.conn.clone();
        let timeout = inner.settings.timeout;
        let mut cmd = redis::cmd("SET");
        cmd.arg(node_key(inner.node))
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64);
        let _ = query(&mut conn, &cmd, timeout).await;
        let remote: Vec<u64> = lock(&inner.remote_nodes).iter().copied().collect();
        let checks = remote.iter().map(|n| {
            let mut conn = inner.conn.clone();
            let cmd = redis::cmd("EXISTS").arg(node_key(*n)).clone();
            async move { query(&mut conn, &cmd, timeout).await }
        });
        let results = join_all(checks).await;
        for (node, r) in remote.into_iter().zip(results) {
            // Only a clear "the key is gone" counts; Redis being unreachable is not a death.
            if let Ok(Value::Int(0)) = r {
                lock(&inner.remote_nodes).remove(&node);
                tracing::info!(
                    node = format!("{node:016x}"),
                    "node heartbeat expired; removing its presence"
                );
                if let Some(sink) = inner.sink.get().and_then(Weak::upgrade) {
                    sink.node_gone(node);
                }
            }
        }
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
