//! A document's owner task: load, apply log entries in order, answer subscribers, fan out,
//! compact, and save on eviction and shutdown.

mod recover;

use super::outbox::{Proto, awareness_frame, update_frame};
use super::{Command, DocError, DocHandle, Registry, Shared, Subscriber, SyncFrom};
use crate::backplane::{Entry, now_ms};
use crate::connection::yjs;
use crate::storage::Snapshot;
use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId, encode};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use yrs::sync::Awareness;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

/// Replays larger than this are compared with the state diff, and the smaller one is sent.
const LARGE_REPLAY: usize = 64 * 1024;

/// Snapshots at least this big are integrated off the owner task, while joins that want the
/// whole document are answered with the stored bytes (yrs takes about 70 ms per MB to decode
/// and integrate a document; the bytes are already the answer).
const ANSWER_WHILE_LOADING: usize = 256 * 1024;

struct Sub {
    outbox: Arc<super::Outbox>,
    /// Awareness client ids this connection introduced; removed when it leaves.
    awareness_ids: HashSet<ClientID>,
}

pub(crate) struct Owner {
    doc: DocId,
    shared: Arc<Shared>,
    handle: DocHandle,
    registry: Weak<Registry>,
    awareness: Awareness,
    epoch: u64,
    /// Every entry up to this id is applied.
    applied: StreamId,
    /// The newest entries, for replay without I/O: all entries after `recent_floor`.
    recent: VecDeque<(StreamId, Bytes)>,
    recent_bytes: usize,
    recent_floor: StreamId,
    /// Position of the newest snapshot this owner knows is stored.
    snapshot: Option<Position>,
    /// Entries after `applied` were trimmed before this owner applied them (see
    /// [`recover`]): until a reload from the snapshot ends it, nothing is applied or saved.
    gap: bool,
    /// When to read the log again after a read or a reload failed.
    retry_at: Option<Instant>,
    /// The document holds blocks whose dependencies it never received (see `ingest`).
    missing_deps: bool,
    since_snapshot: (usize, usize),
    subs: HashMap<u64, Sub>,
    native_subs: usize,
    yjs_subs: usize,
    waiters: Vec<(StreamId, oneshot::Sender<Position>)>,
    /// Awareness client ids introduced by clients of other nodes, per node, so that a dead
    /// node's presence can be removed.
    remote_awareness: HashMap<u64, HashSet<ClientID>>,
    /// Which local connection introduced each awareness client id: only it may set or remove
    /// that id's state (y-protocols has no ownership; without this any client could move or
    /// erase another's cursor).
    awareness_owner: HashMap<ClientID, u64>,
    /// Awareness clients removed since the tombstones were last compacted.
    departed: usize,
    /// The whole document encoded at a position (a snapshot just loaded or saved, or a full
    /// state sent to a joining client), reused while the document stays at that position:
    /// joins of a large idle document don't each re-encode it.
    full_state: std::cell::RefCell<Option<(Position, Bytes)>>,
}

/// Awareness client ids one connection may introduce per document. A Yjs client uses one
/// (its document's client id); a few more leave room for clients that hold several docs
/// under one socket id scheme, without letting one socket flood everyone's presence.
pub(crate) const MAX_AWARENESS_IDS: usize = 8;

/// Callers waiting for one document to apply an entry (read-your-writes, a position from
/// another node); see `Owner::wait_applied`.
const MAX_WAITERS: usize = 1024;

/// See `Owner::note_departed`.
const AWARENESS_COMPACT_EVERY: usize = 64;
const AWARENESS_TOMBSTONE_GRACE_MS: u64 = 30_000;

/// How long one node may hold a document's compaction lock (snapshot + trim).
const COMPACTION_LOCK: std::time::Duration = std::time::Duration::from_secs(30);

impl Owner {
    pub(crate) fn new(
        doc: DocId,
        shared: Arc<Shared>,
        handle: DocHandle,
        registry: Weak<Registry>,
    ) -> Self {
        Owner {
            doc,
            shared,
            handle,
            registry,
            awareness: Awareness::new(Doc::new()),
            epoch: 0,
            applied: StreamId::ZERO,
            recent: VecDeque::new(),
            recent_bytes: 0,
            recent_floor: StreamId::ZERO,
            snapshot: None,
            gap: false,
            retry_at: None,
            missing_deps: false,
            since_snapshot: (0, 0),
            subs: HashMap::new(),
            native_subs: 0,
            yjs_subs: 0,
            waiters: Vec::new(),
            remote_awareness: HashMap::new(),
            awareness_owner: HashMap::new(),
            departed: 0,
            full_state: std::cell::RefCell::new(None),
        }
    }

    fn position(&self) -> Position {
        Position::new(self.epoch, self.applied)
    }

    /// The owner task. The owner lives in a box beside a small future: a future keeps room
    /// for a by-value `self` for its whole life next to where the body moves it, and a
    /// document is held for as long as it is hot.
    pub(crate) fn run(
        self,
        commands: mpsc::Receiver<Command>,
        entries: mpsc::Receiver<(u64, Vec<Entry>)>,
    ) -> impl std::future::Future<Output = ()> + Send {
        let mut owner = Box::new(self);
        async move { owner.serve(commands, entries).await }
    }

    async fn serve(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut entries: mpsc::Receiver<(u64, Vec<Entry>)>,
    ) {
        let loading = Instant::now();
        // Boxed: it runs once, and its state would otherwise take room for the owner's life.
        if let Err(e) = Box::pin(self.load(&mut commands)).await {
            tracing::error!(doc = %self.doc, error = %e, "document could not be loaded");
            self.unregister();
            commands.close();
            while let Some(cmd) = commands.recv().await {
                refuse(cmd, DocError::Unavailable);
            }
            return;
        }
        self.shared.backplane.watch(&self.doc, self.applied);
        if loading.elapsed() > crate::backplane::READER_STALL {
            // The reader starts at what the load read, which may be older than a trim since.
            self.handle.inner.lagged.store(true, Ordering::Release);
        }
        tracing::debug!(doc = %self.doc, position = %self.position(), "document loaded");
        let cancel = self.shared.cancel.clone();
        let evict_after = self.shared.settings.evict_after;
        let mut idle_since = Some(Instant::now());
        loop {
            let idle = idle_since.is_some();
            self.handle.inner.idle.store(idle, Ordering::Release);
            if self.handle.inner.lagged.swap(false, Ordering::AcqRel) {
                self.catch_up().await;
            }
            let evict_at = idle_since.map(|t| t + evict_after);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some((epoch, batch)) = entries.recv() => self.apply_entries(epoch, batch).await,
                Some(cmd) = commands.recv() => self.handle_command(cmd).await,
                _ = sleep_until_opt(evict_at) => break,
                // The registry is at its cap and wants room: an idle document goes early.
                _ = self.handle.inner.evict_now.notified(), if idle => break,
                // `lagged` was set from outside (a reader that may have skipped entries): the
                // top of the loop re-reads.
                _ = self.handle.inner.recheck.notified() => {}
                _ = sleep_until_opt(self.retry_at) => self.on_retry(),
            }
            // Waiters do not keep a document hot: each has its own deadline, and those still
            // waiting at unload are answered with where the document stands.
            idle_since = match (self.subs.is_empty(), idle_since) {
                (true, None) => Some(Instant::now()),
                (true, since) => since,
                (false, _) => None,
            };
        }
        // Unloading. Save while still registered, so that "no longer hot" implies "saved";
        // commands that arrive meanwhile wait and are then told to go to a fresh owner, which
        // loads from storage. Unwatch before unregistering: a new owner can only start after
        // we unregister, so its `watch` comes last. With a shared log, only the holder of the
        // document's compaction lock writes snapshots.
        self.save_snapshot_locked().await;
        let position = self.position();
        for (_, reply) in self.waiters.drain(..) {
            let _ = reply.send(position);
        }
        self.shared.backplane.unwatch(&self.doc);
        self.unregister();
        commands.close();
        while let Ok(cmd) = commands.try_recv() {
            refuse(cmd, DocError::Gone);
        }
        tracing::debug!(doc = %self.doc, "document unloaded");
    }

    fn unregister(&self) {
        if let Some(r) = self.registry.upgrade() {
            r.remove(&self.doc, self.handle.inner.generation);
        }
    }

    async fn load(&mut self, commands: &mut mpsc::Receiver<Command>) -> Result<(), String> {
        let recover::Whole {
            snapshot,
            head,
            entries,
        } = self.read_whole().await?;
        self.epoch = head.epoch;
        if let Some(s) = snapshot {
            self.handle
                .inner
                .approx_size
                .store(s.state.len(), Ordering::Relaxed);
            let current = s.position.epoch == head.epoch;
            if current {
                self.applied = s.position.id;
                self.snapshot = Some(s.position);
            }
            // The snapshot is the whole document when the log holds nothing after it.
            let whole = current && entries.iter().all(|e| e.id <= s.position.id);
            if whole && s.state.len() >= ANSWER_WHILE_LOADING {
                self.integrate_answering(s.state.clone(), commands).await?;
                *self.full_state.borrow_mut() = Some((s.position, s.state));
            } else {
                let update = Update::decode_v1(&s.state)
                    .map_err(|e| format!("snapshot does not decode: {e}"))?;
                self.awareness
                    .doc()
                    .transact_mut()
                    .apply_update(update)
                    .map_err(|e| format!("snapshot does not apply: {e}"))?;
            }
        }
        self.recent_floor = head.floor;
        self.ingest(entries);
        let sv = self.awareness.doc().transact().state_vector();
        self.handle
            .publish_known(sv.iter().map(|(c, k)| (*c, *k)), true);
        Ok(())
    }

    /// Integrates a large snapshot on a blocking thread and, meanwhile, answers joins that
    /// want the whole document with the snapshot's own bytes: a cold load costs the client a
    /// file read and a send, not the integration. Each connection's commands stay in order:
    /// from its first one that needs the integrated document on, its later ones wait too.
    async fn integrate_answering(
        &mut self,
        state: Bytes,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), String> {
        let doc = self.awareness.doc().clone();
        let bytes = state.clone();
        let handle = self.handle.clone();
        let integrate = self.shared.tracker.spawn_blocking(move || {
            let update =
                Update::decode_v1(&bytes).map_err(|e| format!("snapshot does not decode: {e}"))?;
            // Clients answered early may write at once; what they build on is the snapshot,
            // and their appends apply after it, so the write path may count it as known now
            // (a snapshot starts every client at clock 0, where yrs's state vector is exact).
            handle.publish_known(update.state_vector().iter().map(|(c, k)| (*c, *k)), true);
            doc.transact_mut()
                .apply_update(update)
                .map_err(|e| format!("snapshot does not apply: {e}"))
        });
        tokio::pin!(integrate);
        let position = self.position();
        let mut waiting: Vec<Command> = Vec::new();
        let mut blocked: HashSet<u64> = HashSet::new();
        // y-websocket joins answered early still owe their sync step 1 (our state vector).
        let mut step1_owed: Vec<u64> = Vec::new();
        let integrated = loop {
            tokio::select! {
                done = &mut integrate => break done,
                Some(cmd) = commands.recv() => {
                    let conn = cmd.conn();
                    if conn.is_some_and(|c| blocked.contains(&c)) {
                        waiting.push(cmd);
                        continue;
                    }
                    if let Some(cmd) = self.answer_from_state(cmd, &state, position, &mut step1_owed) {
                        blocked.extend(conn);
                        waiting.push(cmd);
                    }
                }
            }
        };
        let integrated = integrated
            .map_err(|e| format!("snapshot integration failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = integrated {
            // Joins answered from the bytes are told to go elsewhere and come back.
            for sub in self.subs.values() {
                sub.outbox
                    .request_close(chorus_protocol::CloseCode::InternalError);
            }
            for cmd in waiting {
                refuse(cmd, DocError::Unavailable);
            }
            return Err(e);
        }
        if !step1_owed.is_empty() {
            let sv = self.awareness.doc().transact().state_vector();
            let frame = Bytes::from(yjs::sync_step1_message(&sv));
            for conn in step1_owed {
                if let Some(sub) = self.subs.get(&conn) {
                    sub.outbox.push_frame(&self.doc, frame.clone());
                }
            }
        }
        for cmd in waiting {
            self.handle_command(cmd).await;
        }
        Ok(())
    }

    /// While a snapshot integrates: answers `cmd` from the snapshot's bytes if it only needs
    /// the whole document; gives it back otherwise.
    fn answer_from_state(
        &mut self,
        cmd: Command,
        state: &Bytes,
        position: Position,
        step1_owed: &mut Vec<u64>,
    ) -> Option<Command> {
        let answered = || {
            metrics::counter!(crate::metrics::names::ANSWERED_WHILE_LOADING).increment(1);
        };
        match cmd {
            Command::Subscribe { sub, from, reply }
                if from.position.is_none()
                    && from.state_vector.as_ref().is_none_or(|sv| sv.is_empty()) =>
            {
                let _ = reply.send(Ok(()));
                let conn = sub.conn;
                let proto = sub.outbox.proto;
                self.add_sub(sub);
                let outbox = &self.subs[&conn].outbox;
                match proto {
                    Proto::Native => {
                        answered();
                        outbox.push_synced(
                            &self.doc,
                            Bytes::from(encode::synced(self.doc.as_str(), state, position, false)),
                            position,
                        )
                    }
                    // A y-websocket client asks with its own step 1; ours follows once we have
                    // a state vector.
                    Proto::Yjs => step1_owed.push(conn),
                }
                self.send_awareness_snapshot(conn);
                None
            }
            Command::SyncStep1 { conn, state_vector }
                if state_vector.is_empty() && self.subs.contains_key(&conn) =>
            {
                answered();
                let frame = Bytes::from(yjs::sync_step2_message(state));
                self.subs[&conn]
                    .outbox
                    .push_synced(&self.doc, frame, position);
                None
            }
            Command::State { reply } => {
                answered();
                let _ = reply.send((state.to_vec(), position));
                None
            }
            other => Some(other),
        }
    }

    /// Applies entries newer than `applied` and remembers them for replay. Returns the ones
    /// that were new.
    fn ingest(&mut self, entries: Vec<Entry>) -> Vec<Entry> {
        let mut fresh = Vec::with_capacity(entries.len());
        let mut grown: Vec<(ClientID, u32)> = Vec::new();
        let mut exact = false;
        let pending = {
            // `Doc` is a shared handle; a clone lets the transaction live beside `&mut self`.
            let doc = self.awareness.doc().clone();
            let mut txn = doc.transact_mut();
            for e in entries {
                if e.id <= self.applied {
                    // Already covered (by the snapshot, or delivered twice): keep it for replay
                    // if it is newer than what we remember.
                    if self.recent.back().is_none_or(|(id, _)| *id < e.id)
                        && e.id > self.recent_floor
                    {
                        self.remember(e.id, e.update.clone());
                    }
                    continue;
                }
                let applied = catch_unwind(AssertUnwindSafe(|| {
                    Update::decode_v1(&e.update)
                        .map_err(|err| err.to_string())
                        .and_then(|u| txn.apply_update(u).map_err(|err| err.to_string()))
                }));
                match applied {
                    Ok(Ok(())) => {
                        // yrs's `Update::state_vector` only counts updates that start at clock
                        // 0, so the reach comes from our own walk of the entry.
                        match crate::validate::scan_update(&e.update) {
                            Ok(deps) => grown.extend(deps.ends().map(|(c, end)| {
                                (ClientID::new(c), u32::try_from(end).unwrap_or(u32::MAX))
                            })),
                            Err(_) => exact = true,
                        }
                    }
                    // Entries are validated before they are appended, so this means a yrs bug
                    // or a log written by something else. The node keeps serving; the entry's
                    // position still counts as passed so positions stay meaningful.
                    Ok(Err(err)) => {
                        tracing::error!(doc = %self.doc, id = %e.id, error = %err, "log entry did not apply")
                    }
                    Err(_) => {
                        tracing::error!(doc = %self.doc, id = %e.id, "log entry made yrs panic; skipped")
                    }
                }
                self.applied = e.id;
                self.since_snapshot.0 += 1;
                self.since_snapshot.1 += e.update.len();
                self.handle
                    .inner
                    .approx_size
                    .fetch_add(e.update.len(), Ordering::Relaxed);
                self.remember(e.id, e.update.clone());
                fresh.push(e);
            }
            // Writers only append updates whose dependencies are met, so the log integrates
            // fully and the applied updates' reach is the document's new state. A log written
            // otherwise (older versions, another tool) can leave something pending; then the
            // exact state vector is published instead, which leaves pending blocks out.
            let missing = txn.has_missing_updates();
            if missing && !self.missing_deps {
                tracing::warn!(doc = %self.doc, "log entries wait for missing dependencies");
            }
            self.missing_deps = missing;
            if missing || exact {
                Some(txn.state_vector())
            } else {
                None
            }
        };
        if !fresh.is_empty() {
            // The document moved on; don't hold a stale copy of it.
            *self.full_state.get_mut() = None;
        }
        match pending {
            Some(sv) => self
                .handle
                .publish_known(sv.iter().map(|(c, k)| (*c, *k)), true),
            None if !grown.is_empty() => self.handle.publish_known(grown, false),
            None => {}
        }
        fresh
    }

    fn remember(&mut self, id: StreamId, update: Bytes) {
        self.recent_bytes += update.len();
        self.recent.push_back((id, update));
        while self.recent_bytes > self.shared.settings.replay_memory_bytes {
            let Some((old, u)) = self.recent.pop_front() else {
                break;
            };
            self.recent_bytes -= u.len();
            self.recent_floor = old;
        }
    }

    async fn apply_entries(&mut self, epoch: u64, entries: Vec<Entry>) {
        if self.gap {
            return; // the reload reads these from the log, after what the gap lacks
        }
        if epoch != self.epoch {
            self.reset_epoch().await;
            return;
        }
        let (before, had_missing) = (self.applied, self.missing_deps);
        let fresh = self.ingest(entries);
        if self.missing_deps && !had_missing && self.trimmed_after(before).await {
            // Their dependencies were in entries we never read: nothing of this batch goes
            // out at a position past the gap.
            self.applied = before;
            return self.recover_gap().await;
        }
        for e in &fresh {
            self.fan_out(e);
        }
        self.wake_waiters();
        self.maybe_compact().await;
    }

    fn fan_out(&self, e: &Entry) {
        let started = std::time::Instant::now();
        let position = Position::new(self.epoch, e.id);
        let native = (self.native_subs > 0)
            .then(|| update_frame(Proto::Native, &self.doc, &e.update, position));
        let yjs =
            (self.yjs_subs > 0).then(|| update_frame(Proto::Yjs, &self.doc, &e.update, position));
        let own = e.origin.filter(|o| o.node == self.shared.node);
        for (conn, sub) in &self.subs {
            if let Some(o) = own.filter(|o| o.conn == *conn) {
                sub.outbox.push_own(&self.doc, o.seq, position);
                continue;
            }
            let frame = match sub.outbox.proto {
                Proto::Native => native.clone(),
                Proto::Yjs => yjs.clone(),
            };
            if let Some(frame) = frame {
                sub.outbox
                    .push_update(&self.doc, frame, e.update.clone(), position);
            }
        }
        let others =
            self.subs.len() - usize::from(own.is_some_and(|o| self.subs.contains_key(&o.conn)));
        let hot = crate::metrics::hot();
        hot.updates_out.increment(others as u64);
        hot.fanout_seconds.record(started.elapsed().as_secs_f64());
    }

    /// Answers the waiters whose entry is applied, and forgets those nobody waits for any more.
    fn wake_waiters(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let position = self.position();
        let mut i = 0;
        while i < self.waiters.len() {
            let (id, reply) = &self.waiters[i];
            if *id <= self.applied || reply.is_closed() {
                let (_, reply) = self.waiters.swap_remove(i);
                let _ = reply.send(position);
            } else {
                i += 1;
            }
        }
    }

    /// A caller waits until the entry `id` is applied. Callers check first that such an entry
    /// can exist ([`crate::backplane::Backplane::may_hold`]) and bound their wait; here the
    /// number of waiters is bounded too: past [`MAX_WAITERS`] (after forgetting those whose
    /// caller gave up) a waiter is answered at once with where the document stands, which its
    /// caller reads as "not applied yet".
    fn wait_applied(&mut self, id: StreamId, reply: oneshot::Sender<Position>) {
        if id <= self.applied {
            let _ = reply.send(self.position());
            return;
        }
        if self.waiters.len() >= MAX_WAITERS {
            self.waiters.retain(|(_, r)| !r.is_closed());
        }
        if self.waiters.len() >= MAX_WAITERS {
            let _ = reply.send(self.position());
            return;
        }
        self.waiters.push((id, reply));
    }

    async fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe { sub, from, reply } => {
                let _ = reply.send(Ok(()));
                self.subscribe(sub, from);
            }
            Command::Unsubscribe { conn } => self.unsubscribe(conn),
            Command::Awareness { conn, update } => self.apply_awareness(conn, update),
            Command::SyncStep1 { conn, state_vector } => {
                if let Some(sub) = self.subs.get(&conn) {
                    let diff = self.encode_diff(&state_vector);
                    let frame = Bytes::from(yjs::sync_step2_message(&diff));
                    sub.outbox.push_synced(&self.doc, frame, self.position());
                }
            }
            Command::QueryAwareness { conn } => self.send_awareness_snapshot(conn),
            Command::Resync { conn, from } => self.send_sync(
                conn,
                &SyncFrom {
                    position: from,
                    state_vector: None,
                },
            ),
            Command::State { reply } => {
                let state = self.encode_diff(&StateVector::default());
                let _ = reply.send((state, self.position()));
            }
            Command::WaitApplied { id, reply } => self.wait_applied(id, reply),
            Command::RemoteAwareness { node, update } => self.apply_remote_awareness(node, &update),
            Command::NodeGone { node } => self.remove_node_awareness(node),
        }
    }

    fn subscribe(&mut self, sub: Subscriber, from: SyncFrom) {
        let conn = sub.conn;
        let offer_only = sub.outbox.proto == Proto::Yjs
            && from.position.is_none()
            && from.state_vector.is_none();
        self.add_sub(sub);
        if offer_only {
            // y-websocket join: offer our state vector. The client answers with what we miss
            // and its own step 1, whose answer (step 2) carries the document. The offer has
            // no content, so it moves no position.
            let sv = self.awareness.doc().transact().state_vector();
            if let Some(sub) = self.subs.get(&conn) {
                sub.outbox
                    .push_frame(&self.doc, Bytes::from(yjs::sync_step1_message(&sv)));
            }
        } else {
            self.send_sync(conn, &from);
        }
        self.send_awareness_snapshot(conn);
    }

    fn add_sub(&mut self, sub: Subscriber) {
        let conn = sub.conn;
        sub.outbox.attach(&self.doc, self.handle.clone());
        match sub.outbox.proto {
            Proto::Native => self.native_subs += 1,
            Proto::Yjs => self.yjs_subs += 1,
        }
        // Re-subscribing on the same socket keeps the presence it introduced: those ids are
        // still its own (`awareness_owner` says so), and its leave must still clear them.
        let awareness_ids = match self.subs.remove(&conn) {
            Some(old) => {
                match old.outbox.proto {
                    Proto::Native => self.native_subs -= 1,
                    Proto::Yjs => self.yjs_subs -= 1,
                }
                old.awareness_ids
            }
            None => HashSet::new(),
        };
        self.subs.insert(
            conn,
            Sub {
                outbox: sub.outbox,
                awareness_ids,
            },
        );
    }

    /// Brings one subscriber up to the current position: exact replay when its position is
    /// still in memory, otherwise a diff against its state vector (or the whole document).
    /// Always with content, for either protocol: a catch-up that only offered our state vector
    /// would leave a stock y-websocket client, which has already sent its own step 1, without
    /// the document.
    fn send_sync(&self, conn: u64, from: &SyncFrom) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let position = self.position();
        let state_diff = || self.encode_diff(&from.state_vector.clone().unwrap_or_default());
        let (update, replay) = match from.position.and_then(|p| self.replay_after(p)) {
            Some(update) if update.len() <= LARGE_REPLAY => (update, true),
            Some(update) => {
                // A long replay can be far larger than the state it leads to (a value
                // overwritten many times): send whichever is smaller. Both bring the client
                // to `position`; the state is a superset of what it had.
                let state = state_diff();
                if state.len() < update.len() {
                    (state, false)
                } else {
                    (update, true)
                }
            }
            None => (state_diff(), false),
        };
        let frame = match sub.outbox.proto {
            Proto::Native => {
                Bytes::from(encode::synced(self.doc.as_str(), &update, position, replay))
            }
            Proto::Yjs => Bytes::from(yjs::sync_step2_message(&update)),
        };
        sub.outbox.push_synced(&self.doc, frame, position);
    }

    /// The entries after `p`, merged, if `p` is a position we can replay from exactly.
    fn replay_after(&self, p: Position) -> Option<Vec<u8>> {
        // Epoch 0 (no log yet) is never replayed from: see `LogHead`.
        if p.epoch == 0 || p.epoch != self.epoch || p.id < self.recent_floor || p.id > self.applied
        {
            return None;
        }
        let start = self.recent.partition_point(|(id, _)| *id <= p.id);
        let missed: Vec<&[u8]> = self
            .recent
            .range(start..)
            .map(|(_, u)| u.as_ref())
            .collect();
        match missed.len() {
            0 => Some(Update::EMPTY_V1.to_vec()),
            1 => Some(missed[0].to_vec()),
            _ => yrs::merge_updates_v1(missed).ok(),
        }
    }

    fn encode_diff(&self, sv: &StateVector) -> Vec<u8> {
        if sv.is_empty() {
            return self.encode_whole().to_vec();
        }
        self.encode_against(sv)
    }

    fn encode_against(&self, sv: &StateVector) -> Vec<u8> {
        let txn = self.awareness.doc().transact();
        catch_unwind(AssertUnwindSafe(|| txn.encode_state_as_update_v1(sv))).unwrap_or_else(|_| {
            tracing::error!(doc = %self.doc, "document failed to encode");
            Update::EMPTY_V1.to_vec()
        })
    }

    /// The whole document, from the cache when it is still at the current position.
    fn encode_whole(&self) -> Bytes {
        let position = self.position();
        if let Some((at, state)) = &*self.full_state.borrow()
            && *at == position
        {
            return state.clone();
        }
        let state = Bytes::from(self.encode_against(&StateVector::default()));
        *self.full_state.borrow_mut() = Some((position, state.clone()));
        state
    }

    fn send_awareness_snapshot(&self, conn: u64) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let Ok(update) = self.awareness.update() else {
            return;
        };
        if update.clients.is_empty() {
            return;
        }
        let raw = update.encode_v1();
        let frame = awareness_frame(sub.outbox.proto, &self.doc, &raw);
        sub.outbox
            .push_awareness(&self.doc, frame, Bytes::from(raw));
    }

    fn unsubscribe(&mut self, conn: u64) {
        let Some(sub) = self.subs.remove(&conn) else {
            return;
        };
        sub.outbox.detach(&self.doc);
        match sub.outbox.proto {
            Proto::Native => self.native_subs -= 1,
            Proto::Yjs => self.yjs_subs -= 1,
        }
        if sub.awareness_ids.is_empty() {
            return;
        }
        let ids: Vec<ClientID> = sub.awareness_ids.into_iter().collect();
        for id in &ids {
            self.awareness_owner.remove(id);
            self.awareness.remove_state(*id);
        }
        let departed = ids.len();
        if let Ok(update) = self.awareness.update_with_clients(ids) {
            let raw = update.encode_v1();
            self.broadcast_awareness(None, &raw);
            self.shared
                .backplane
                .publish_awareness(&self.doc, Bytes::from(raw));
        }
        self.note_departed(departed);
    }

    /// yrs keeps a removed client's clock forever (a tombstone, so that a late copy of its
    /// old state is not taken as new). Clients come and go, so after every
    /// [`AWARENESS_COMPACT_EVERY`] removals the tombstones of clients last heard of more than
    /// [`AWARENESS_TOMBSTONE_GRACE_MS`] ago are dropped: by then no late copy of their state
    /// can still be on its way (y-protocols itself forgets states after 30 s of silence).
    fn note_departed(&mut self, n: usize) {
        self.departed += n;
        if self.departed < AWARENESS_COMPACT_EVERY {
            return;
        }
        self.departed = 0;
        if let Some(fresh) = without_old_tombstones(&self.awareness, now_ms()) {
            self.awareness = fresh;
        }
    }

    fn apply_remote_awareness(&mut self, node: u64, raw: &[u8]) {
        let Ok(update) = yrs::sync::awareness::AwarenessUpdate::decode_v1(raw) else {
            return; // validated by the publishing node; nothing else writes this stream
        };
        // A removal (state `null`) ends that node's claim, so the client may reappear through
        // any node (a reconnect through the load balancer).
        let claims = self.remote_awareness.entry(node).or_default();
        let mut departed = 0;
        for (id, entry) in &update.clients {
            if &*entry.json == "null" {
                claims.remove(id);
                departed += 1;
            } else {
                claims.insert(*id);
            }
        }
        if let Ok(Some(summary)) = self.awareness.apply_update_summary(update)
            && let Ok(changed) = self.awareness.update_with_clients(summary.all_changes())
        {
            self.broadcast_awareness(None, &changed.encode_v1());
        }
        self.note_departed(departed);
    }

    fn remove_node_awareness(&mut self, node: u64) {
        let Some(ids) = self.remote_awareness.remove(&node) else {
            return;
        };
        let ids: Vec<ClientID> = ids.into_iter().collect();
        for id in &ids {
            self.awareness.remove_state(*id);
        }
        let departed = ids.len();
        if let Ok(update) = self.awareness.update_with_clients(ids) {
            self.broadcast_awareness(None, &update.encode_v1());
        }
        self.note_departed(departed);
    }

    fn apply_awareness(&mut self, conn: u64, update: yrs::sync::awareness::AwarenessUpdate) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let mut introduced = 0;
        let mut foreign = false;
        for id in update.clients.keys() {
            if sub.awareness_ids.contains(id) {
                continue;
            }
            introduced += 1;
            foreign |= self.awareness_owner.contains_key(id)
                || self.remote_awareness.values().any(|ids| ids.contains(id));
        }
        if foreign || sub.awareness_ids.len() + introduced > MAX_AWARENESS_IDS {
            // All or nothing: a partly applied update would still move someone else's cursor.
            self.shared
                .refused_awareness
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(doc = %self.doc, conn, foreign, "awareness update refused");
            if sub.outbox.proto == Proto::Native {
                let message = if foreign {
                    "the awareness update touches a client id another connection introduced"
                } else {
                    "this socket already introduced the most awareness client ids allowed"
                };
                let frame = chorus_protocol::ServerFrame::Error {
                    code: chorus_protocol::ErrorCode::AwarenessNotOwned,
                    message: message.into(),
                    doc: Some(self.doc.as_str().to_owned()),
                    seq: None,
                };
                if let Ok(bytes) = frame.encode() {
                    sub.outbox.push_control(Bytes::from(bytes));
                }
            }
            return;
        }
        let ids: Vec<ClientID> = update.clients.keys().copied().collect();
        if let Some(sub) = self.subs.get_mut(&conn) {
            sub.awareness_ids.extend(ids.iter().copied());
        }
        for id in ids {
            self.awareness_owner.insert(id, conn);
        }
        let departed = update
            .clients
            .values()
            .filter(|e| &*e.json == "null")
            .count();
        self.note_departed(departed);
        match self.awareness.apply_update_summary(update) {
            Ok(Some(summary)) => {
                if let Ok(changed) = self.awareness.update_with_clients(summary.all_changes()) {
                    let raw = changed.encode_v1();
                    self.broadcast_awareness(Some(conn), &raw);
                    self.shared
                        .backplane
                        .publish_awareness(&self.doc, Bytes::from(raw));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(doc = %self.doc, error = %e, "awareness update ignored"),
        }
    }

    fn broadcast_awareness(&self, except: Option<u64>, raw: &[u8]) {
        let raw = Bytes::copy_from_slice(raw);
        let native =
            (self.native_subs > 0).then(|| awareness_frame(Proto::Native, &self.doc, &raw));
        let yjs = (self.yjs_subs > 0).then(|| awareness_frame(Proto::Yjs, &self.doc, &raw));
        for (conn, sub) in &self.subs {
            if Some(*conn) == except {
                continue;
            }
            let frame = match sub.outbox.proto {
                Proto::Native => native.clone(),
                Proto::Yjs => yjs.clone(),
            };
            if let Some(frame) = frame {
                sub.outbox.push_awareness(&self.doc, frame, raw.clone());
            }
        }
    }

    async fn maybe_compact(&mut self) {
        let s = self.shared.settings.clone();
        let (entries, bytes) = self.since_snapshot;
        let snapshot_bytes = self.handle.approx_size().saturating_sub(bytes);
        if !compaction_due(entries, bytes, snapshot_bytes, &s) {
            return;
        }
        // Every node applies every entry, so all of them reach the threshold together; the
        // lock lets one compact. The others start counting afresh instead of asking again on
        // every entry.
        match self
            .shared
            .backplane
            .lock_compaction(&self.doc, COMPACTION_LOCK)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.since_snapshot = (0, 0);
                return;
            }
            Err(e) => {
                tracing::warn!(doc = %self.doc, error = %e, "compaction lock unavailable; retrying later");
                self.since_snapshot = (0, 0);
                return;
            }
        }
        self.compact_locked(&s).await;
        self.shared.backplane.unlock_compaction(&self.doc).await;
    }

    /// Snapshot first, trim after: a crash in between leaves a log that still holds
    /// everything the snapshot covers, so nothing is lost.
    async fn compact_locked(&mut self, s: &super::DocSettings) {
        if !self.save_snapshot().await {
            return;
        }
        // Keep the replay window behind the snapshot; everything older is in the snapshot.
        let window_start = StreamId::new(
            now_ms().saturating_sub(s.replay_window.as_millis() as u64),
            0,
        );
        let before = window_start.min(self.applied.successor());
        if let Err(e) = self.shared.backplane.trim(&self.doc, before).await {
            tracing::warn!(doc = %self.doc, error = %e, "trimming the log failed; it will be retried at the next compaction");
        }
    }

    /// Saves a snapshot under the compaction lock (nodes sharing a snapshot store take turns).
    /// Without the lock nothing is saved: another node is saving, and the log still holds
    /// everything.
    async fn save_snapshot_locked(&mut self) {
        if let Ok(true) = self
            .shared
            .backplane
            .lock_compaction(&self.doc, COMPACTION_LOCK)
            .await
        {
            self.save_snapshot().await;
            self.shared.backplane.unlock_compaction(&self.doc).await;
        }
    }

    /// Saves a snapshot if anything was applied since the last one. Returns whether the stored
    /// snapshot now covers everything applied.
    async fn save_snapshot(&mut self) -> bool {
        let position = self.position();
        if self.snapshot == Some(position)
            || (self.applied == StreamId::ZERO && self.snapshot.is_none())
        {
            return !self.gap;
        }
        if !self.log_still_ours().await {
            return false;
        }
        let position = self.position();
        if self.snapshot == Some(position) {
            return true;
        }
        let state = self.encode_whole();
        self.handle
            .inner
            .approx_size
            .store(state.len(), Ordering::Relaxed);
        let snapshot = Snapshot { position, state };
        match self.shared.store.save(&self.doc, snapshot).await {
            Ok(_) => {
                self.snapshot = Some(position);
                self.since_snapshot = (0, 0);
                tracing::debug!(doc = %self.doc, %position, "snapshot saved");
                true
            }
            Err(e) => {
                tracing::error!(doc = %self.doc, error = %e, "saving the snapshot failed; the log still holds everything");
                false
            }
        }
    }
}

/// `awareness` without the tombstones whose client was last heard of more than
/// [`AWARENESS_TOMBSTONE_GRACE_MS`] before `now` (ms; yrs stamps a state when it is set, not
/// when it is removed), or `None` when it has none. yrs has no way to forget one client, so a fresh
/// awareness over the same document takes what is kept: live states and recent tombstones,
/// clocks unchanged.
fn without_old_tombstones(awareness: &Awareness, now: u64) -> Option<Awareness> {
    let mut keep = HashMap::new();
    let mut dropped = 0usize;
    for (id, state) in awareness.iter() {
        let json = match state.data {
            Some(json) => json,
            None if now.saturating_sub(state.last_updated) < AWARENESS_TOMBSTONE_GRACE_MS => {
                "null".into()
            }
            None => {
                dropped += 1;
                continue;
            }
        };
        let clock = state.clock;
        keep.insert(id, AwarenessUpdateEntry { clock, json });
    }
    if dropped == 0 {
        return None;
    }
    let mut fresh = Awareness::new(awareness.doc().clone());
    if let Err(e) = fresh.apply_update(AwarenessUpdate { clients: keep }) {
        tracing::warn!(error = %e, "awareness could not be compacted");
        return None;
    }
    tracing::debug!(dropped, "awareness tombstones dropped");
    Some(fresh)
}

/// A snapshot encodes and writes the whole document, so it waits until the log behind it is
/// worth that: `compact_entries` entries whose bytes are at least a quarter of the last
/// snapshot (at most four bytes of snapshot written per byte of log: a large document typed
/// into one character at a time is not rewritten every thousand keystrokes), or sixteen times
/// that many entries whatever their size (what a cold load replays stays bounded), or
/// `compact_bytes`.
fn compaction_due(
    entries: usize,
    bytes: usize,
    snapshot_bytes: usize,
    s: &super::DocSettings,
) -> bool {
    const SNAPSHOT_BYTES_PER_LOG_BYTE: usize = 4;
    const MOST_ENTRIES_FACTOR: usize = 16;
    bytes >= s.compact_bytes
        || entries >= s.compact_entries.saturating_mul(MOST_ENTRIES_FACTOR)
        || (entries >= s.compact_entries
            && bytes.saturating_mul(SNAPSHOT_BYTES_PER_LOG_BYTE) >= snapshot_bytes)
}

fn refuse(cmd: Command, err: DocError) {
    match cmd {
        Command::Subscribe { reply, .. } => drop(reply.send(Err(err))),
        // Dropping the reply senders tells the callers the document went away.
        _ => drop(cmd),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings() -> super::super::DocSettings {
        super::super::DocSettings {
            evict_after: Duration::from_secs(30),
            compact_entries: 1000,
            compact_bytes: 4 << 20,
            replay_window: Duration::from_secs(600),
            replay_memory_bytes: 1 << 20,
            max_hot_documents: 10_000,
        }
    }

    #[test]
    fn departed_awareness_clients_are_forgotten_after_the_grace_period() {
        let mut aw = Awareness::new(Doc::new());
        let entry = |clock, json: &str| AwarenessUpdateEntry {
            clock,
            json: json.into(),
        };
        let clients = (1..=100u64)
            .map(|id| (ClientID::new(id), entry(3, "{\"x\":1}")))
            .collect();
        aw.apply_update(AwarenessUpdate { clients }).expect("apply");
        for id in 2..=100u64 {
            aw.remove_state(ClientID::new(id));
        }
        assert_eq!(aw.iter().count(), 100, "yrs keeps every tombstone");
        let now = now_ms();
        assert!(
            without_old_tombstones(&aw, now).is_none(),
            "within the grace period nothing is dropped"
        );
        let fresh = without_old_tombstones(&aw, now + AWARENESS_TOMBSTONE_GRACE_MS + 1)
            .expect("old tombstones dropped");
        assert_eq!(fresh.iter().count(), 1, "only the live client is left");
        assert_eq!(
            fresh.meta(ClientID::new(1)).map(|m| m.0),
            Some(3),
            "clock kept"
        );
        assert_eq!(
            fresh.state::<serde_json::Value>(ClientID::new(1)),
            Some(serde_json::json!({"x": 1}))
        );
    }

    #[test]
    fn a_recent_tombstone_is_kept_and_still_refuses_a_late_copy_of_the_old_state() {
        use std::sync::atomic::AtomicU64;
        let t0 = 1_000_000_000u64;
        let now = Arc::new(AtomicU64::new(t0));
        let clock = now.clone();
        let mut aw = Awareness::with_clock(Doc::new(), move || clock.load(Ordering::Relaxed));
        let update = |entries: &[(u64, u32, &str)]| AwarenessUpdate {
            clients: entries
                .iter()
                .map(|(id, clock, json)| {
                    let entry = AwarenessUpdateEntry {
                        clock: *clock,
                        json: (*json).into(),
                    };
                    (ClientID::new(*id), entry)
                })
                .collect(),
        };
        aw.apply_update(update(&[(1, 5, "{}"), (2, 5, "{}")]))
            .expect("apply");
        aw.remove_state(ClientID::new(2));
        // yrs stamps a state when it is set, not when it is removed.
        now.store(t0 + 20_000, Ordering::Relaxed);
        aw.apply_update(update(&[(1, 6, "{}")])).expect("apply");
        aw.remove_state(ClientID::new(1));
        let mut fresh = without_old_tombstones(&aw, t0 + 35_000).expect("2's tombstone is old");
        assert_eq!(fresh.iter().count(), 1, "1's tombstone is recent and kept");
        assert_eq!(fresh.meta(ClientID::new(1)).map(|m| m.0), Some(7));
        // A late copy of client 1's old state is still refused...
        fresh.apply_update(update(&[(1, 6, "{}")])).expect("apply");
        assert_eq!(fresh.state::<serde_json::Value>(ClientID::new(1)), None);
        // ...while client 2, forgotten, may come back with any clock.
        fresh.apply_update(update(&[(2, 1, "{}")])).expect("apply");
        assert!(fresh.state::<serde_json::Value>(ClientID::new(2)).is_some());
    }

    #[test]
    fn compaction_waits_until_the_log_is_worth_rewriting_the_document() {
        let s = settings();
        // A small document compacts every `compact_entries` entries, as configured.
        assert!(!compaction_due(999, 30_000, 0, &s));
        assert!(compaction_due(1000, 30_000, 0, &s));
        assert!(compaction_due(1000, 30_000, 100_000, &s));
        // A 37 MB document typed into one character at a time (~30 bytes an entry) is not
        // rewritten every thousand keystrokes...
        let big = 37 << 20;
        assert!(!compaction_due(1000, 30_000, big, &s));
        assert!(!compaction_due(15_999, 480_000, big, &s));
        // ...but a cold load never replays more than sixteen times that many entries.
        assert!(compaction_due(16_000, 480_000, big, &s));
        // Large updates compact once their bytes are a quarter of the snapshot, or by bytes.
        assert!(compaction_due(1000, big / 4, big, &s));
        assert!(compaction_due(10, 4 << 20, big, &s));
    }
}
