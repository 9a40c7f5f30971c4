//! Documents (data-flow steps 2, 3, 5, 6): the registry that loads them on first use and
//! evicts them when idle, and the handle connections use to talk to a document's owner task.
//!
//! Each hot document has exactly one owner task ([`actor`]) holding the yrs state; nothing
//! else touches it, so no lock is ever held across an await. The registry is also the
//! backplane's [`EntrySink`]: log entries are routed to the owner of their document.
//!
//! Updates reach the log through [`admit`], the one write door every protocol and the HTTP API
//! share; they reach the owner only from the log. Documents know no protocol: each subscriber's
//! [`wire`] encodes what goes to it, and its [`outbox`] holds what waits.

mod actor;
pub mod admit;
pub mod outbox;
pub mod wire;

use crate::backplane::{Backplane, Entry, EntrySink};
use crate::storage::SnapshotStore;
use crate::validate::Deps;
use chorus_protocol::{DocId, Position, StreamId};
use outbox::Outbox;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::{ClientID, StateVector};

/// A connection's id on this node.
pub type ConnId = u64;

/// Settings the documents need from the node's config.
#[derive(Debug, Clone)]
pub struct DocSettings {
    pub evict_after: Duration,
    pub compact_entries: usize,
    pub compact_bytes: usize,
    pub replay_window: Duration,
    pub replay_memory_bytes: usize,
    /// Most documents loaded at once on this node (`--max-hot-documents`).
    pub max_hot_documents: usize,
}

/// What a subscriber brings so the document can tell what it is missing.
#[derive(Debug, Clone, Default)]
pub struct SyncFrom {
    pub position: Option<Position>,
    pub state_vector: Option<StateVector>,
}

pub struct Subscriber {
    pub conn: ConnId,
    pub outbox: Arc<Outbox>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// The owner task is evicting or gone; the caller should look the document up again.
    #[error("document is being unloaded")]
    Gone,
    /// The document could not be loaded (storage failure or corrupt snapshot).
    #[error("document could not be loaded")]
    Unavailable,
    /// The node already holds `--max-hot-documents` documents and none of them could be
    /// unloaded to make room in time.
    #[error("this node holds as many documents as it may (--max-hot-documents); retry later")]
    Full,
}

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
            | Command::NodeGone { .. } => None,
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
    inner: Arc<HandleInner>,
}

struct HandleInner {
    doc: DocId,
    generation: u64,
    commands: mpsc::Sender<Command>,
    entries: mpsc::Sender<(u64, Vec<Entry>)>,
    /// Set when an entry batch could not be queued; the owner re-reads the log from its last
    /// applied id instead of the sink ever blocking or buffering without bound.
    lagged: AtomicBool,
    /// Encoded size at the last snapshot plus update bytes since: what the size limit checks.
    approx_size: AtomicUsize,
    /// The document's state vector as of the newest applied entry, published by the owner so
    /// writers can check an update's dependencies without a round trip to it.
    known: std::sync::RwLock<StateVector>,
    /// Bumped whenever `known` grows, to wake writers waiting for dependencies.
    known_version: watch::Sender<u64>,
    /// Set by the owner while nobody holds the document (it waits out `--evict-after`).
    idle: AtomicBool,
    /// The registry needs room: an idle owner unloads now instead of at its deadline.
    evict_now: tokio::sync::Notify,
    /// `lagged` was set by someone other than a full entry queue: wakes the owner to re-read.
    recheck: tokio::sync::Notify,
}

/// Clients whose clocks are copied out of `known` per read lock (see [`DocHandle::clocks_of`]).
const KNOWN_STRETCH: usize = 1024;

/// How long, and how many times, a load at the hot-document cap waits for an idle document to
/// unload (it saves a snapshot first, usually within milliseconds).
const ROOM_WAIT: Duration = Duration::from_millis(500);
const ROOM_WAITS: usize = 2;

/// Commands waiting for one document's owner; senders wait when it is full.
const COMMAND_QUEUE: usize = 1024;
/// Entry batches waiting for one document's owner; past this the owner catches up from the log.
const ENTRY_QUEUE: usize = 256;

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
    fn publish_known(&self, grown: impl IntoIterator<Item = (ClientID, u32)>, replace: bool) {
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

    /// A handle whose owner is the test: it receives the commands sent to the document.
    #[cfg(test)]
    pub(crate) fn for_tests(doc: &DocId) -> (DocHandle, mpsc::Receiver<Command>) {
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let handle = DocHandle {
            inner: Arc::new(HandleInner {
                doc: doc.clone(),
                generation: 0,
                commands,
                entries: mpsc::channel(1).0,
                lagged: AtomicBool::new(false),
                approx_size: AtomicUsize::new(0),
                known: std::sync::RwLock::new(StateVector::default()),
                known_version: watch::channel(0).0,
                idle: AtomicBool::new(false),
                evict_now: tokio::sync::Notify::new(),
                recheck: tokio::sync::Notify::new(),
            }),
        };
        (handle, rx)
    }

    async fn send(&self, cmd: Command) -> Result<(), DocError> {
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

    /// Resolves once the document has applied the entry `id` (read-your-writes for HTTP).
    pub async fn wait_applied(&self, id: StreamId) -> Result<Position, DocError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::WaitApplied { id, reply }).await?;
        rx.await.map_err(|_| DocError::Gone)
    }
}

pub(crate) struct Shared {
    pub backplane: Arc<dyn Backplane>,
    pub store: Arc<dyn SnapshotStore>,
    pub settings: DocSettings,
    pub node: u64,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// Awareness updates refused for touching a client id another connection introduced.
    pub refused_awareness: AtomicU64,
}

/// Why [`Registry::handle`] did not load a document.
enum NoRoom {
    /// At the cap; an idle document was asked to unload.
    Evicting,
    /// At the cap, and every document is in use.
    Full,
}

/// Every hot document on this node.
pub struct Registry {
    docs: Mutex<HashMap<DocId, DocHandle>>,
    /// Woken whenever a document unloads, for loads waiting for room under the cap.
    room: tokio::sync::Notify,
    /// Loads refused at the hot-document cap.
    refused_loads: AtomicU64,
    shared: Arc<Shared>,
    generation: AtomicU64,
    me: std::sync::Weak<Registry>,
}

impl Registry {
    pub fn new(
        backplane: Arc<dyn Backplane>,
        store: Arc<dyn SnapshotStore>,
        settings: DocSettings,
        node: u64,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        let registry = Arc::new_cyclic(|me| Registry {
            docs: Mutex::new(HashMap::new()),
            room: tokio::sync::Notify::new(),
            refused_loads: AtomicU64::new(0),
            shared: Arc::new(Shared {
                backplane: backplane.clone(),
                store,
                settings,
                node,
                cancel: CancellationToken::new(),
                tracker,
                refused_awareness: AtomicU64::new(0),
            }),
            generation: AtomicU64::new(1),
            me: me.clone(),
        });
        let sink: Arc<dyn EntrySink> = registry.clone();
        backplane.attach(Arc::downgrade(&sink));
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DocId, DocHandle>> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn node(&self) -> u64 {
        self.shared.node
    }

    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.shared.backplane
    }

    /// Awareness updates refused so far for touching another connection's client id.
    pub fn refused_awareness(&self) -> u64 {
        self.shared.refused_awareness.load(Ordering::Relaxed)
    }

    pub fn hot_documents(&self) -> usize {
        self.lock().len()
    }

    /// Whether `doc` is hot or could be loaded now (under the cap, or an idle document could
    /// make room): lets a caller refuse before it commits to anything, e.g. an upgrade.
    pub fn has_room_for(&self, doc: &DocId) -> bool {
        let docs = self.lock();
        docs.len() < self.shared.settings.max_hot_documents.max(1)
            || docs.contains_key(doc)
            || docs.values().any(|h| h.inner.idle.load(Ordering::Acquire))
    }

    /// Loads refused so far because the node held `--max-hot-documents` documents.
    pub fn refused_loads(&self) -> u64 {
        self.refused_loads.load(Ordering::Relaxed)
    }

    /// The document's handle, starting its owner (which loads it) if it is not hot.
    ///
    /// At `--max-hot-documents` a document that is not hot is not loaded: one idle document
    /// (no subscriber, no waiter: it only waits out `--evict-after`) is asked to unload at
    /// once, and [`Registry::with_owner`] waits for that room. Unloading early is the same unload as at the idle deadline: it saves first and
    /// unregisters last, and a command that reaches the owner meanwhile is answered `Gone`
    /// and retried against a fresh owner, so nobody notices beyond a reload.
    fn handle(&self, doc: &DocId) -> Result<DocHandle, NoRoom> {
        let mut docs = self.lock();
        if let Some(h) = docs.get(doc)
            && !h.inner.commands.is_closed()
        {
            return Ok(h.clone());
        }
        // An owner that stopped (closed commands) is still counted until it unregisters.
        if docs.len() >= self.shared.settings.max_hot_documents.max(1) {
            let idle = docs.values().find(|h| h.inner.idle.load(Ordering::Acquire));
            return Err(match idle {
                Some(h) => {
                    h.inner.evict_now.notify_one();
                    NoRoom::Evicting
                }
                None => NoRoom::Full,
            });
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (entries_tx, entries_rx) = mpsc::channel(ENTRY_QUEUE);
        let handle = DocHandle {
            inner: Arc::new(HandleInner {
                doc: doc.clone(),
                generation: self.generation.fetch_add(1, Ordering::Relaxed),
                commands: cmd_tx,
                entries: entries_tx,
                lagged: AtomicBool::new(false),
                approx_size: AtomicUsize::new(0),
                known: std::sync::RwLock::new(StateVector::default()),
                known_version: watch::channel(0).0,
                idle: AtomicBool::new(false),
                evict_now: tokio::sync::Notify::new(),
                recheck: tokio::sync::Notify::new(),
            }),
        };
        // Registered before the owner reads the log, so no entry appended meanwhile is missed
        // (duplicates are skipped by id).
        docs.insert(doc.clone(), handle.clone());
        drop(docs);
        let owner = actor::Owner::new(
            doc.clone(),
            self.shared.clone(),
            handle.clone(),
            self.me.clone(),
        );
        self.shared.tracker.spawn(owner.run(cmd_rx, entries_rx));
        Ok(handle)
    }

    /// Runs `op` against the document's owner; if the owner it reached was unloading, runs it
    /// again against a fresh one (which loads from storage). At the hot-document cap it waits
    /// (bounded) for an idle document to make room, then gives up with [`DocError::Full`].
    pub async fn with_owner<T, F, Fut>(&self, doc: &DocId, op: F) -> Result<T, DocError>
    where
        F: Fn(DocHandle) -> Fut,
        Fut: std::future::Future<Output = Result<T, DocError>>,
    {
        let mut room_waits = 0;
        for _ in 0..3 {
            let handle = loop {
                match self.handle(doc) {
                    Ok(h) => break h,
                    Err(NoRoom::Evicting) if room_waits < ROOM_WAITS => {
                        room_waits += 1;
                        // A wake-up missed between the check and here costs one wait, not a
                        // wrong answer.
                        let _ = tokio::time::timeout(ROOM_WAIT, self.room.notified()).await;
                    }
                    Err(_) => {
                        self.refused_loads.fetch_add(1, Ordering::Relaxed);
                        return Err(DocError::Full);
                    }
                }
            };
            match op(handle).await {
                Err(DocError::Gone) => continue,
                other => return other,
            }
        }
        Err(DocError::Unavailable)
    }

    /// Subscribes a connection to a document (loading it if needed); returns the handle it
    /// holds from then on.
    pub async fn subscribe(
        &self,
        doc: &DocId,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        from: &SyncFrom,
    ) -> Result<DocHandle, DocError> {
        self.with_owner(doc, |h| {
            let (outbox, from) = (outbox.clone(), from.clone());
            async move { h.subscribe(conn, outbox, from).await.map(|()| h) }
        })
        .await
    }

    /// Called by an owner that is unloading: forget it unless a newer owner took its place.
    fn remove(&self, doc: &DocId, generation: u64) {
        let mut docs = self.lock();
        if docs
            .get(doc)
            .is_some_and(|h| h.inner.generation == generation)
        {
            docs.remove(doc);
            drop(docs);
            self.room.notify_waiters();
        }
    }

    /// Tells every owner to save and stop; resolves when all have.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let handles: Vec<DocHandle> = self.lock().values().cloned().collect();
        for h in handles {
            h.inner.commands.closed().await;
        }
    }
}

impl EntrySink for Registry {
    fn deliver(&self, doc: &DocId, epoch: u64, entries: Vec<Entry>) {
        let Some(h) = self.lock().get(doc).cloned() else {
            return; // not hot here: the entries are in the log for whoever loads it next
        };
        if h.inner.lagged.load(Ordering::Acquire) {
            // The owner will re-read these from the log; wake it in case its last catch-up
            // failed and it waits for its retry.
            h.inner.recheck.notify_one();
            return;
        }
        // Log ids start with their append time in ms: how far behind the reader runs.
        if let Some(last) = entries.last() {
            let lag_ms = crate::backplane::now_ms().saturating_sub(last.id.ms);
            crate::metrics::hot()
                .stream_read_lag_seconds
                .record(lag_ms as f64 / 1000.0);
        }
        if h.inner.entries.try_send((epoch, entries)).is_err() {
            h.inner.lagged.store(true, Ordering::Release);
        }
    }

    fn deliver_awareness(&self, doc: &DocId, node: u64, update: bytes::Bytes) {
        let Some(h) = self.lock().get(doc).cloned() else {
            return;
        };
        // Presence is best-effort: with the owner's queue full this state is dropped and the
        // client's next (periodic) awareness update replaces it.
        let _ = h
            .inner
            .commands
            .try_send(Command::RemoteAwareness { node, update });
    }

    fn recheck(&self, doc: &DocId) {
        let Some(h) = self.lock().get(doc).cloned() else {
            return; // not hot here: whoever loads it next reads the log and checks its floor
        };
        h.inner.lagged.store(true, Ordering::Release);
        h.inner.recheck.notify_one();
    }

    fn node_gone(&self, node: u64) {
        // Must reach every owner (a dropped removal would leave a ghost cursor), so wait for
        // queue room in one task rather than dropping.
        let handles: Vec<DocHandle> = self.lock().values().cloned().collect();
        self.shared.tracker.spawn(async move {
            for h in handles {
                let _ = h.send(Command::NodeGone { node }).await;
            }
        });
    }
}
