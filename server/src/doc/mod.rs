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
mod handle;
pub mod inspect;
pub mod json;
pub mod outbox;
pub mod restore;
pub mod versions;
pub mod wire;

use crate::backplane::{Backplane, Entry, EntrySink};
use crate::storage::SnapshotStore;
use chorus_protocol::{DocId, Position};
use outbox::Outbox;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use yrs::StateVector;

pub(crate) use handle::Command;
use handle::{COMMAND_QUEUE, ENTRY_QUEUE};
pub use handle::{DocHandle, LOAD_WAIT, Readiness};

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
    /// Automatic versions (`--version-interval`, `--keep-versions`).
    pub versions: versions::VersionPolicy,
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

/// How long, and how many times, a load at the hot-document cap waits for an idle document to
/// unload (it saves a snapshot first, usually within milliseconds).
const ROOM_WAIT: Duration = Duration::from_millis(500);
const ROOM_WAITS: usize = 2;

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

    /// Whether the document is loaded on this node right now.
    pub fn is_hot(&self, doc: &DocId) -> bool {
        self.lock()
            .get(doc)
            .is_some_and(|h| !h.inner.commands.is_closed())
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
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let handle = DocHandle::new(doc, generation, cmd_tx, entries_tx);
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
