//! Redis backplane, connection (data-flow steps 4–5): one handle, one bounded round trip.

use crate::backplane::{BackplaneError, BackplaneResult};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::Mutex;
use std::time::Duration;

/// One handle over a standalone or cluster connection; both multiplex and pipeline
/// concurrent requests, and reconnect on their own.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// A reader's own connection (no reconnect logic: the reader reconnects itself).
    Plain(redis::aio::MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
        }
    }
}

pub(super) fn storage<E: std::fmt::Display>(e: E) -> BackplaneError {
    BackplaneError::Storage(e.to_string())
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commands this process sent to Redis (an EVAL counts once, whatever the script does
/// inside), for the benchmark's "commands per update".
static COMMANDS_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn commands_sent() -> u64 {
    COMMANDS_SENT.load(std::sync::atomic::Ordering::Relaxed)
}

pub(super) fn count(n: u64) {
    COMMANDS_SENT.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// Runs one command with the backplane's bound on a round trip.
pub(super) async fn query(conn: &mut Conn, cmd: &Cmd, timeout: Duration) -> BackplaneResult<Value> {
    query_op(conn, cmd, timeout, "command").await
}

/// [`query`], counting a failure under `op` in [`crate::metrics::names::REDIS_ERRORS`].
pub(super) async fn query_op(
    conn: &mut Conn,
    cmd: &Cmd,
    timeout: Duration,
    op: &'static str,
) -> BackplaneResult<Value> {
    count(1);
    let result = match tokio::time::timeout(timeout, cmd.query_async::<Value>(conn)).await {
        Err(_) => Err(BackplaneError::Storage(format!(
            "redis did not answer within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(storage(e)),
        Ok(Ok(Value::ServerError(e))) => Err(storage(format!("{e:?}"))),
        Ok(Ok(v)) => Ok(v),
    };
    if result.is_err() {
        metrics::counter!(crate::metrics::names::REDIS_ERRORS, "op" => op).increment(1);
    }
    result
}

impl Conn {
    /// Another handle on the same connection (both kinds multiplex).
    pub(super) fn clone_for_read(&self) -> Conn {
        self.clone()
    }
}
