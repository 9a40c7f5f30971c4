//! The handle to one document's owner task (data-flow steps 3–6): the commands a connection
//! or the HTTP API sends it, and what the owner publishes for writers without a round trip
//! (the state vector it has applied, its approximate size).

use super::outbox::Outbox;
use super::{ConnId, DocError, Subscriber, SyncFrom};
use crate::backplane::Entry;
use crate::validate::Deps;
use chorus_protocol::{DocId, Position, StreamId};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use yrs::sync::awareness::AwarenessUpdate;
use yrs::{ClientID, StateVector};

pub(crate) enum Command {
    Subscribe {
        sub: Subscriber,
        from: SyncFrom,
        reply: oneshot::Sender<Result<(), DocError>>,
    },
    Unsubscribe {
        conn: ConnId,
    },
    Awareness {
        conn: ConnId,
        update: AwarenessUpdate,
    },
    /// The client sent its state vector and waits for what it lacks (y-websocket's sync step
    /// 1): answered through its outbox.
    Diff {
        conn: ConnId,
        state_vector: StateVector,
    },
    /// Send every awareness state to this connection (a y-websocket query, or a snapshot
    /// owed after its outbox dropped presence for the budget).
    QueryAwareness {
        conn: ConnId,
    },
    /// The connection's outbox dropped pending updates; bring it up to date.
    Resync {
        conn: ConnId,
        from: Option<Position>,
    },
    State {
        reply: oneshot::Sender<(Vec<u8>, Position)>,
    },
    WaitApplied {
        id: StreamId,
        reply: oneshot::Sender<Position>,
    },
    /// Awareness published by a client on another node.
    RemoteAwareness {
        node: u64,
        update: bytes::Bytes,
    },
    /// A node died: drop the presence of its clients.
    NodeGone {
        node: u64,
    },
    /// What the owner knows about the document, for the inspector.
    Inspect {
        reply: oneshot::Sender<super::inspect::OwnerFacts>,
    },
}

impl Command {
    /// The connection a command is about, if any.
    pub(crate) fn conn(&self) -> Option<ConnId> {
        match self {
            Command::Subscribe { sub, .. } => Some(sub.conn),
            Command::Unsubscribe { conn }
            | Command::Awareness { conn, .. }
            | Command::Diff { conn, .. }
            | Command::QueryAwareness { conn }
            | Command::Resync { conn, .. } => Some(*conn),
            Command::State { .. }
            | Command::WaitApplied { .. }
            | Command::RemoteAwareness { .. }
            | Command::NodeGone { .. }
            | Command::Inspect { .. } => None,
        }
    }
}

/// Longest an update waits for its document to finish loading before its dependencies are
/// judged (a very large snapshot can take seconds to integrate).
pub const LOAD_WAIT: Duration = Duration::from_secs(30);

/// Whether an update may be appended (see [`DocHandle::wait_ready`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Everything it builds on is in the document (or in the writer's admitted appends).
    Met,
    /// Something it builds on did not arrive within the wait.
    Missing,
    /// It continues the writer's own update whose append failed (our fault, not the client's).
    Lost,
}

/// A cheap, cloneable way to reach a document's owner task.
#[derive(Clone)]
pub struct DocHandle {
    pub(super) inner: Arc<HandleInner>,
}

pub(super) struct HandleInner {
    pub(super) doc: DocId,
    pub(super) generation: u64,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) entries: mpsc::Sender<(u64, Vec<Entry>)>,
    /// Set when an entry batch could not be queued; the owner re-reads the log from its last
    /// applied id instead of the sink ever blocking or buffering without bound.
    pub(super) lagged: AtomicBool,
    /// Encoded size at the last snapshot plus update bytes since: what the size limit checks.
    pub(super) approx_size: AtomicUsize,
    /// The document's state vector as of the newest applied entry, published by the owner so
    /// writers can check an update's dependencies without a round trip to it.
    pub(super) known: std::sync::RwLock<StateVector>,
    /// Bumped whenever `known` grows, to wake writers waiting for dependencies.
    pub(super) known_version: watch::Sender<u64>,
    /// Set by the owner while nobody holds the document (it waits out `--evict-after`).
    pub(super) idle: AtomicBool,
    /// The registry needs room: an idle owner unloads now instead of at its deadline.
    pub(super) evict_now: tokio::sync::Notify,
    /// `lagged` was set by someone other than a full entry queue: wakes the owner to re-read.
    pub(super) recheck: tokio::sync::Notify,
}

/// Clients whose clocks are copied out of `known` per read lock (see [`DocHandle::clocks_of`]).
const KNOWN_STRETCH: usize = 1024;

/// Commands waiting for one document's owner; senders wait when it is full.
pub(super) const COMMAND_QUEUE: usize = 1024;
/// Entry batches waiting for one document's owner; past this the owner catches up from the log.
pub(super) const ENTRY_QUEUE: usize = 256;

impl DocHandle {
    pub fn doc(&self) -> &DocId {
        &self.inner.doc
    }

    /// The document's approximate encoded size (see `--max-document-bytes`).
    pub fn approx_size(&self) -> usize {
        self.inner.approx_size.load(Ordering::Relaxed)
    }

    /// Whether the document (plus `own`: clocks the writer's earlier, already admitted appends
    /// reach) has everything `deps` builds on; waits up to `wait` for it to get there, since a
    /// dependency may still be on its way from another node.
    ///
    /// `lost`: yrs clients whose earlier updates from this writer failed to append; when what is
    /// missing is their own continuation, nothing is on its way and the answer is immediate.
    pub async fn wait_ready(
        &self,
        deps: &Deps,
        own: Option<&HashMap<u64, u64>>,
        lost: Option<&std::collections::HashSet<u64>>,
        wait: Duration,
    ) -> Readiness {
        let clients = deps.clients();
        let met = || {
            let clocks = self.clocks_of(&clients);
            let at = |c| {
                let held = clients.binary_search(&c).map_or(0, |i| clocks[i]);
                held.max(own.and_then(|o| o.get(&c)).copied().unwrap_or(0))
            };
            if deps.met_by(at) {
                Some(Readiness::Met)
            } else if lost.is_some_and(|l| deps.short_of(at).any(|c| l.contains(&c))) {
                Some(Readiness::Lost)
            } else {
                None
            }
        };
        let mut changed = self.inner.known_version.subscribe();
        if *changed.borrow_and_update() == 0 {
            // The document is still loading: nothing it holds is known yet, so nothing can be
            // judged missing. Wait for the owner's first publish (a large snapshot publishes
            // as soon as it is decoded), bounded in case the load never finishes.
            let loading = wait.max(LOAD_WAIT);
            let _ = tokio::time::timeout(loading, changed.changed()).await;
        }
        match met() {
            Some(answer) => return answer,
            None if wait.is_zero() => return Readiness::Missing,
            None => {}
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(answer) = met() {
                return answer;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                // Deadline, or the owner is gone.
                _ => return met().unwrap_or(Readiness::Missing),
            }
        }
    }

    /// Whether `deps` is met right now, without waiting: `None` when it is not (yet), or while
    /// the document is still loading (nothing can be judged missing before its state is
    /// known). For writers that keep reading while an update waits ([`Self::known_changes`]
    /// says when to ask again).
    pub fn readiness_now(&self, deps: &Deps, own: &HashMap<u64, u64>) -> Option<Readiness> {
        if !self.is_loaded() {
            return None;
        }
        let clients = deps.clients();
        let clocks = self.clocks_of(&clients);
        let at = |c| {
            let held = clients.binary_search(&c).map_or(0, |i| clocks[i]);
            held.max(own.get(&c).copied().unwrap_or(0))
        };
        deps.met_by(at).then_some(Readiness::Met)
    }

    /// Whether the document's state is known (it has finished loading its snapshot).
    pub fn is_loaded(&self) -> bool {
        *self.inner.known_version.borrow() != 0
    }

    /// Changes whenever the document learns of more applied state (and when it finishes
    /// loading).
    pub fn known_changes(&self) -> watch::Receiver<u64> {
        self.inner.known_version.subscribe()
    }

    /// Drops entries of `own` the document has caught up with.
    pub fn forget_known(&self, own: &mut HashMap<u64, u64>) {
        let mut clients: Vec<u64> = own.keys().copied().collect();
        clients.sort_unstable();
        let clocks = self.clocks_of(&clients);
        for (c, clock) in clients.iter().zip(clocks) {
            if own.get(c).is_some_and(|end| clock >= *end) {
                own.remove(c);
            }
        }
    }

    /// The document's clock for each of `clients`, copied out a stretch at a time, so the
    /// owner's [`publish_known`](Self::publish_known) never waits behind more than one stretch
    /// of lookups (a hostile update can name hundreds of thousands of clients) and nothing is
    /// computed under the lock.
    ///
    /// The stretches may see different versions, but `known` only grows, so each clock is one
    /// the document had at some moment of the call: a dependency check on them answers `Met`
    /// only if it would on the state at the end of the call, and `Missing` only if it would on
    /// the state at its start (the wait re-checks on every publish).
    fn clocks_of(&self, clients: &[u64]) -> Vec<u64> {
        let mut clocks = Vec::with_capacity(clients.len());
        for stretch in clients.chunks(KNOWN_STRETCH) {
            let known = self.inner.known.read().unwrap_or_else(|p| p.into_inner());
            clocks.extend(
                stretch
                    .iter()
                    .map(|&c| u64::from(known.get(&ClientID::new(c)))),
            );
        }
        clocks
    }

    /// Called by the owner after applying entries: `grown` holds the clocks the applied
    /// updates reached (or, after a reload, the whole state vector).
    pub(super) fn publish_known(
        &self,
        grown: impl IntoIterator<Item = (ClientID, u32)>,
        replace: bool,
    ) {
        {
            let mut known = self.inner.known.write().unwrap_or_else(|p| p.into_inner());
            if replace {
                *known = StateVector::default();
            }
            for (c, clock) in grown {
                known.set_max(c, clock);
            }
        }
        self.inner.known_version.send_modify(|v| *v += 1);
    }

    /// A handle to a document's owner, which reads `commands` and `entries` at their other end.
    pub(super) fn new(
        doc: &DocId,
        generation: u64,
        commands: mpsc::Sender<Command>,
        entries: mpsc::Sender<(u64, Vec<Entry>)>,
    ) -> DocHandle {
        DocHandle {
            inner: Arc::new(HandleInner {
                doc: doc.clone(),
                generation,
                commands,
                entries,
                lagged: AtomicBool::new(false),
                approx_size: AtomicUsize::new(0),
                known: std::sync::RwLock::new(StateVector::default()),
                known_version: watch::channel(0).0,
                idle: AtomicBool::new(false),
                evict_now: tokio::sync::Notify::new(),
                recheck: tokio::sync::Notify::new(),
            }),
        }
    }

    /// A handle whose owner is the test: it receives the commands sent to the document.
    #[cfg(test)]
    pub(crate) fn for_tests(doc: &DocId) -> (DocHandle, mpsc::Receiver<Command>) {
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let handle = DocHandle::new(doc, 0, commands, mpsc::channel(1).0);
        (handle, rx)
    }

    pub(super) async fn send(&self, cmd: Command) -> Result<(), DocError> {
        self.inner
            .commands
            .send(cmd)
            .await
            .map_err(|_| DocError::Gone)
    }

    pub async fn subscribe(
        &self,
        conn: ConnId,
        outbox: Arc<Outbox>,
        from: SyncFrom,
    ) -> Result<(), DocError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Subscribe {
            sub: Subscriber { conn, outbox },
            from,
            reply,
        })
        .await?;
        rx.await.map_err(|_| DocError::Gone)?
    }

    pub async fn unsubscribe(&self, conn: ConnId) {
        let _ = self.send(Command::Unsubscribe { conn }).await;
    }

    pub async fn awareness(&self, conn: ConnId, update: AwarenessUpdate) -> Result<(), DocError> {
        self.send(Command::Awareness { conn, update }).await
    }

    /// Asks for what the client lacks against `state_vector` (see [`wire::Join::Offer`]).
    pub async fn diff(&self, conn: ConnId, state_vector: StateVector) -> Result<(), DocError> {
        self.send(Command::Diff { conn, state_vector }).await
    }

    pub async fn query_awareness(&self, conn: ConnId) -> Result<(), DocError> {
        self.send(Command::QueryAwareness { conn }).await
    }

    pub async fn resync(&self, conn: ConnId, from: Option<Position>) {
        let _ = self.send(Command::Resync { conn, from }).await;
    }

    /// The whole document as one v1 update, and the position it reflects.
    pub async fn state(&self) -> Result<(Vec<u8>, Position), DocError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::State { reply }).await?;
        rx.await.map_err(|_| DocError::Gone)
    }

    /// What the owner knows about the document (see [`super::inspect`]).
    pub async fn inspect(&self) -> Result<super::inspect::OwnerFacts, DocError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Inspect { reply }).await?;
        rx.await.map_err(|_| DocError::Gone)
    }

    /// Resolves once the document has applied the entry `id` (read-your-writes for HTTP).
    pub async fn wait_applied(&self, id: StreamId) -> Result<Position, DocError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::WaitApplied { id, reply }).await?;
        rx.await.map_err(|_| DocError::Gone)
    }
}
