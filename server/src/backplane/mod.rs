//! The log every update passes through (data-flow steps 4–5): append, read back, trim, epochs.
//!
//! A backplane owns each document's log. Appends are durable before they complete; entries
//! reach the node's documents only through an [`EntrySink`], in log order — a node's own
//! appends included — so every position handed to a client means "everything up to here".
//! The embedded implementation is single-node; the Redis one ([`redis`]) shares logs, presence
//! and a compaction lock between nodes behind the same trait.

pub mod embedded;
pub mod redis;
pub mod webhook_store;

pub use embedded::wal_replay::{Damage, WalError};

use crate::validate::Reach;
use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::future::BoxFuture;

/// Who appended an entry, so the node that holds that connection can answer with an `ack`
/// instead of echoing the update back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The node's random id for this process.
    pub node: u64,
    /// The connection's id on that node.
    pub conn: u64,
    /// The client's `seq` for the update, echoed in the ack.
    pub seq: Option<u64>,
    /// The connection's append chain for this document (see [`Chains`]). Only the writing
    /// node's log writer reads it; it is not stored in the log (read back as 0).
    pub chain: u64,
}

/// One log entry: a validated yrs v1 update.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: StreamId,
    pub update: Bytes,
    pub origin: Option<Origin>,
    /// What this node's write door learned about `update` when it checked it, carried so that
    /// the owner does not scan the update again. Only a node's own appends on a log that hands
    /// back the appended bytes themselves (the embedded one) have it; entries read back from
    /// storage, or through Redis, are scanned by the owner. It is not stored.
    pub reach: Option<Reach>,
}

/// A revoked subject or token id, as every node must apply it (see `Auth::revoke`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub sub: Option<String>,
    pub jti: Option<String>,
    /// Until when a revoked token id must be remembered (Unix seconds).
    pub exp: Option<u64>,
    /// When it was issued (Unix seconds): a subject's tokens issued up to then are refused, on
    /// every node alike.
    pub at: u64,
}

/// Applies revocations published by any node (the node closes the matching sockets).
pub type RevocationSink = std::sync::Arc<dyn Fn(Revocation) + Send + Sync>;

/// Where a document's log stands.
///
/// A log exists only once something was appended: reading a document (subscribe, GET, SSE,
/// long-poll, `/y`) stores nothing, so any id a client can name costs no durable state. A
/// document without a log reads as epoch 0 ([`LogHead::NONE`]). Its first append creates the
/// log with a fresh epoch, exactly as a lost log is recreated. So a position a reader got
/// before the log existed (epoch 0) meets the epoch rule every other stale position meets: it
/// never matches a log's epoch, and the reader gets a full state-vector sync, never a replay
/// that could skip something. (Epoch 0 cannot be trusted even against another epoch-0 head:
/// between the two reads a log may have been created, written, snapshotted and lost again.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHead {
    /// This incarnation of the log; a new one gets a new epoch. 0: there is no log.
    pub epoch: u64,
    /// Id of the newest entry ever appended (`0-0` if none).
    pub last: StreamId,
    /// Every entry with an id greater than this is still in the log; older ones were trimmed.
    pub floor: StreamId,
}

impl LogHead {
    /// The head of a document with no log.
    pub const NONE: LogHead = LogHead {
        epoch: 0,
        last: StreamId::ZERO,
        floor: StreamId::ZERO,
    };

    /// Whether the log still holds every entry after `id` of its epoch: nothing after it was
    /// trimmed. A reader that applied up to `id` and finds this false has a gap (see
    /// `doc::actor::recover`), and a snapshot at `id` cannot be the base of this log.
    pub fn holds_after(&self, id: StreamId) -> bool {
        self.floor <= id
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    #[error("log storage failed: {0}")]
    Storage(String),
    #[error("the log is overloaded; retry")]
    Overloaded,
    #[error("the backplane is shut down")]
    Closed,
    /// An earlier append of the same connection to the same document failed and the
    /// connection had not heard of it when it made this one (see [`Chains`]).
    #[error(
        "an earlier update of this connection to this document was not appended, and this one may build on it; send your state again"
    )]
    EarlierAppendFailed,
    /// The embedded log's write-ahead segments cannot be replayed without losing
    /// acknowledged entries.
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("{0} is not supported by this log")]
    Unsupported(&'static str),
}

pub type BackplaneResult<T> = Result<T, BackplaneError>;

/// Receives entries in log order. Implemented by the document registry; called from the
/// backplane's own tasks, so it must not block.
pub trait EntrySink: Send + Sync + 'static {
    fn deliver(&self, doc: &DocId, epoch: u64, entries: Vec<Entry>);

    /// An awareness update published by a client on another node (`node`). Presence is
    /// best-effort: a newer state replaces an older one, so a dropped update heals itself.
    fn deliver_awareness(&self, _doc: &DocId, _node: u64, _update: Bytes) {}

    /// `node` stopped heartbeating: the presence of its clients must disappear everywhere.
    fn node_gone(&self, _node: u64) {}

    /// The reader may have skipped entries of `doc`: it reconnected, or it went longer than
    /// [`READER_STALL`] without a read, so a trim may have overtaken its cursor. The document
    /// re-reads its log from what it applied and compares the log's trim floor with that
    /// (reloading from the newest snapshot if entries are gone). Must not block.
    fn recheck(&self, _doc: &DocId) {}
}

/// A reader that went this long between two reads (a reconnect, a paused process, a slow
/// network) asks every document it reads to [`EntrySink::recheck`] its log. A healthy reader
/// reads at least once per blocking read (about a second).
pub const READER_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// The shortest `--replay-window` a shared log accepts. Compaction trims only entries older
/// than the window, so a reader that reads at least every [`READER_STALL`] can never have an
/// entry trimmed before it read it; a reader that stalled longer rechecks (see above).
pub const MIN_SHARED_REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

pub trait Backplane: Send + Sync + 'static {
    /// Short name for logs and `/healthz`.
    fn name(&self) -> &'static str;

    /// Appends one update, creating the document's log (with a fresh epoch) if it has none.
    /// Admission happens in this call, so entries from successive calls are appended in call
    /// order; the future completes once the entry is durable. The entry then reaches the
    /// [`EntrySink`] (with its origin) in log order.
    /// `reach` is what the write door's check learned about `update` (see [`Entry::reach`]);
    /// a log may hand it to the node's owner with the entry, or drop it.
    fn append(
        &self,
        doc: &DocId,
        update: Bytes,
        reach: Option<Reach>,
        origin: Option<Origin>,
    ) -> BoxFuture<'static, BackplaneResult<Position>>;

    /// Entries with ids greater than `after`, oldest first, and the log's head as of the read
    /// ([`LogHead::NONE`] if the document has no log). Never creates anything.
    fn read_after(
        &self,
        doc: &DocId,
        after: StreamId,
    ) -> BoxFuture<'static, BackplaneResult<(LogHead, Vec<Entry>)>>;

    /// Whether the log may hold an entry `id` of its current epoch, now or any moment (an
    /// append this node's reader has not delivered yet). A caller about to wait for a position
    /// asks first, so that a position that cannot exist is answered at once instead of
    /// waited for. A shared log's ids start with their append time on some node's clock, so
    /// by default an id more than [`MAX_CLOCK_SKEW_MS`] ahead of this node's clock cannot
    /// exist yet.
    fn may_hold(&self, _doc: &DocId, id: StreamId) -> BoxFuture<'static, bool> {
        Box::pin(async move { id.ms <= now_ms().saturating_add(MAX_CLOCK_SKEW_MS) })
    }

    /// Drops entries with ids lower than `before` (they are covered by a snapshot).
    fn trim(&self, doc: &DocId, before: StreamId) -> BoxFuture<'static, BackplaneResult<()>>;

    /// Connects the backplane to the node's documents. Called once, before any append.
    fn attach(&self, sink: std::sync::Weak<dyn EntrySink>);

    /// The document is hot on this node: deliver its entries after `after` to the sink from
    /// now on. A shared log's reader adds the document to what it reads; the embedded log
    /// delivers every append anyway and ignores this.
    fn watch(&self, doc: &DocId, after: StreamId);

    /// The document is no longer hot here: stop reading its entries.
    fn unwatch(&self, doc: &DocId);

    /// Publishes a local client's awareness change to the other nodes watching `doc`.
    /// Single-node backplanes have nobody to tell.
    fn publish_awareness(&self, _doc: &DocId, _update: Bytes) {}

    /// Tells every node about a revocation; resolves once it is recorded where the other nodes
    /// read it. A single node has nobody to tell (the caller applies it locally either way).
    fn publish_revocation(&self, _rev: Revocation) -> BoxFuture<'static, BackplaneResult<()>> {
        Box::pin(async { Ok(()) })
    }

    /// From now on, calls `apply` with every revocation any node publishes, starting with the
    /// ones already recorded (so a node that starts later refuses those tokens too). The
    /// future resolves once those already recorded have been applied: a node must not serve
    /// before, or it would let in tokens revoked before it started.
    fn watch_revocations(&self, _apply: RevocationSink) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    /// Takes the document's compaction lock for `ttl` (one node at a time writes snapshots
    /// and trims). A single-node backplane has no competitor, so it always grants it.
    fn lock_compaction(
        &self,
        _doc: &DocId,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'static, BackplaneResult<bool>> {
        Box::pin(async { Ok(true) })
    }

    /// Releases the lock taken with [`Backplane::lock_compaction`] (if this node still holds it).
    fn unlock_compaction(&self, _doc: &DocId) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    /// Whether the log can be reached right now (`/readyz`). An embedded log that opened is
    /// always reachable; a shared one answers a round trip within a short bound.
    fn ping(&self) -> BoxFuture<'static, BackplaneResult<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Stops accepting appends and finishes the ones already admitted.
    fn close(&self) -> BoxFuture<'static, ()>;

    /// Turns on the undelivered-webhook marks (see [`webhook_store`]) and returns the store of
    /// webhook state. Called once, before any append.
    fn enable_webhooks(&self) -> BackplaneResult<std::sync::Arc<dyn webhook_store::WebhookStore>> {
        Err(BackplaneError::Unsupported("change webhooks"))
    }

    /// Whether webhooks can work on this log as it runs (say, the servers' versions), checked
    /// once before the node serves with them.
    fn check_webhooks(&self) -> BoxFuture<'static, BackplaneResult<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Keeps one connection's appends to one document a prefix of what it sent.
///
/// A connection admits an update that builds on one of its own appends still in flight (that
/// is what lets one socket pipeline its writes). If that append then fails (Redis away, a full
/// disk) while a later one goes through once the log is back, the log holds an update without
/// what it builds on: every document parks it as pending and every client that receives it
/// holds an update it cannot integrate (found by the chaos test). So a log writer that fails
/// an append remembers its (document, connection, chain), and refuses every later append of
/// that chain with [`BackplaneError::EarlierAppendFailed`]. The connection starts a new chain
/// once it has heard of the failure, from when on it refuses updates that build on the failed
/// one itself (`lost` in the sessions). Only a failed write adds an entry; entries go once the
/// connection moves on, or after [`CHAIN_MEMORY`] (an append is written or failed long before).
#[derive(Default)]
pub(crate) struct Chains {
    failed: std::collections::HashMap<(DocId, u64), (u64, std::time::Instant)>,
}

/// How long a failed chain is remembered: far longer than any append waits in a writer's queue.
const CHAIN_MEMORY: std::time::Duration = std::time::Duration::from_secs(300);

/// Failed chains remembered at most (a burst of failures across many connections).
const MAX_CHAINS: usize = 65_536;

impl Chains {
    /// Whether an append may be written: not if an earlier append of its chain failed.
    pub fn admits(&mut self, doc: &DocId, origin: Option<&Origin>) -> bool {
        let Some(o) = origin else {
            return true;
        };
        if self.failed.is_empty() {
            return true;
        }
        let key = (doc.clone(), o.conn);
        match self.failed.get(&key) {
            Some((chain, _)) if o.chain <= *chain => false,
            Some(_) => {
                self.failed.remove(&key); // the connection heard and moved on
                true
            }
            None => true,
        }
    }

    /// An append of this chain failed (or was refused): later ones of the chain must not go.
    pub fn fail(&mut self, doc: &DocId, origin: Option<&Origin>) {
        let Some(o) = origin else {
            return;
        };
        let now = std::time::Instant::now();
        if self.failed.len() >= MAX_CHAINS {
            self.failed
                .retain(|_, (_, at)| now.duration_since(*at) < CHAIN_MEMORY);
        }
        if self.failed.len() >= MAX_CHAINS {
            // Still full of fresh failures: forget the oldest half rather than grow.
            let mut ages: Vec<std::time::Instant> =
                self.failed.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            self.failed.retain(|_, (_, at)| *at > cut);
        }
        let entry = self
            .failed
            .entry((doc.clone(), o.conn))
            .or_insert((o.chain, now));
        *entry = (entry.0.max(o.chain), now);
    }
}

/// The future of a queued write: `admitted` is whether the bounded queue took it (admission
/// happens at call time, which is what keeps appends in call order); the answer comes from
/// the writer once the write is durable.
pub(crate) fn answer<T: Send + 'static>(
    admitted: BackplaneResult<()>,
    rx: tokio::sync::oneshot::Receiver<BackplaneResult<T>>,
) -> BoxFuture<'static, BackplaneResult<T>> {
    use futures_util::FutureExt;
    async move {
        admitted?;
        rx.await.unwrap_or(Err(BackplaneError::Closed))
    }
    .boxed()
}

/// A fresh epoch: random, non-zero, and below 2^53 so JavaScript numbers hold it exactly.
pub fn new_epoch() -> u64 {
    loop {
        let e = rand::random::<u64>() & ((1 << 53) - 1);
        if e != 0 {
            return e;
        }
    }
}

/// The id for the next entry after `last`, Redis-style: milliseconds, then a sequence number
/// within the millisecond. Never goes backwards, whatever the wall clock does.
pub fn next_id(last: StreamId, now_ms: u64) -> StreamId {
    if now_ms > last.ms {
        StreamId::new(now_ms, 0)
    } else {
        last.successor()
    }
}

/// How far another node's clock may run ahead of ours before an id it could have handed out
/// is taken as forged (see [`Backplane::may_hold`]).
pub const MAX_CLOCK_SKEW_MS: u64 = 5_000;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_go_backwards() {
        let a = next_id(StreamId::ZERO, 100);
        assert_eq!(a, StreamId::new(100, 0));
        assert_eq!(next_id(a, 100), StreamId::new(100, 1));
        assert_eq!(next_id(StreamId::new(100, 1), 50), StreamId::new(100, 2));
        assert_eq!(next_id(StreamId::new(100, 1), 101), StreamId::new(101, 0));
    }

    #[test]
    fn a_failed_append_fails_the_rest_of_its_chain_until_the_connection_moves_on() {
        let doc = DocId::parse("d").expect("doc id");
        let other = DocId::parse("e").expect("doc id");
        let origin = |conn, chain| Origin {
            node: 1,
            conn,
            seq: None,
            chain,
        };
        let mut chains = Chains::default();
        assert!(chains.admits(&doc, Some(&origin(7, 0))));
        chains.fail(&doc, Some(&origin(7, 0)));
        assert!(!chains.admits(&doc, Some(&origin(7, 0))), "same chain");
        assert!(
            chains.admits(&doc, Some(&origin(8, 0))),
            "another connection"
        );
        assert!(
            chains.admits(&other, Some(&origin(7, 0))),
            "another document"
        );
        assert!(
            chains.admits(&doc, None),
            "appends without an origin (HTTP)"
        );
        assert!(
            chains.admits(&doc, Some(&origin(7, 1))),
            "the connection moved on"
        );
        assert!(
            chains.admits(&doc, Some(&origin(7, 0))),
            "and the entry is gone"
        );
        for conn in 0..(MAX_CHAINS as u64 + 10) {
            chains.fail(&doc, Some(&origin(conn, 0)));
        }
        assert!(chains.failed.len() <= MAX_CHAINS, "bounded");
    }

    #[test]
    fn epochs_fit_javascript_numbers() {
        for _ in 0..1000 {
            let e = new_epoch();
            assert!(e > 0 && e < (1 << 53));
        }
    }
}
