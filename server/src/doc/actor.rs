//! A document's owner task (data-flow steps 2–8 for one document): apply log entries in
//! order, fan them out, subscribe and unsubscribe, answer waiters; its other duties live beside
//! it: [`load`] (snapshot + log), [`sync`] (replay or state diff), [`presence`] (awareness),
//! [`compaction`] (snapshot, trim, save on unload) and [`recover`] (catch-up, epoch changes,
//! trimmed gaps).

mod compaction;
mod inspect;
mod load;
mod presence;
mod recover;
mod sync;
mod versions;

use super::outbox::MAX_DIRECT_PER_TURN;
use super::wire::{Join, MAX_WIRES, Parts};
use super::{Command, DocError, DocHandle, Registry, Shared, Subscriber, SyncFrom};
use crate::backplane::Entry;
use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use yrs::sync::Awareness;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ClientID, Doc, ReadTxn, StateVector, Transact, Update};

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
    /// The whole-document answer as each wire frames it, indexed by [`super::wire::WireId`],
    /// at a position: every client that joins with nothing gets the same bytes, so the owner
    /// encodes and frames a large document once per join storm, not once per joiner. (Each
    /// socket's writer still copies the frame into its own buffer while it sends it: 100 joins
    /// of a 5 MB document peaked at +490 MB before and after this cache.)
    whole_answers: std::cell::RefCell<[Option<(Position, Parts)>; MAX_WIRES]>,
    /// When this owner last saved a snapshot, and at which position (for the inspector).
    last_compaction: Option<(std::time::SystemTime, Position)>,
    /// When the next automatic version is due: set by the first edit after the last one.
    version_due: Option<Instant>,
}

/// Whether the clocks an applied entry reaches are known (added to what the owner publishes),
/// or must be read from the document's exact state vector.
enum Reach {
    Told,
    Unknown,
}

/// Callers waiting for one document to apply an entry (read-your-writes, a position from
/// another node); see `Owner::wait_applied`.
const MAX_WAITERS: usize = 1024;

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
            waiters: Vec::new(),
            remote_awareness: HashMap::new(),
            awareness_owner: HashMap::new(),
            departed: 0,
            full_state: std::cell::RefCell::new(None),
            whole_answers: std::cell::RefCell::new(Default::default()),
            last_compaction: None,
            version_due: None,
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
                _ = sleep_until_opt(self.version_due) => self.keep_auto_version(versions::Occasion::Due),
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
        self.keep_auto_version(versions::Occasion::Unload);
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
                if let Reach::Unknown = self.apply_entry(&mut txn, &e, &mut grown) {
                    exact = true;
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
            self.forget_encoded();
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

    /// Applies one fresh entry to the document and adds the clocks it reaches to `grown`.
    fn apply_entry(
        &self,
        txn: &mut yrs::TransactionMut<'_>,
        e: &Entry,
        grown: &mut Vec<(ClientID, u32)>,
    ) -> Reach {
        let applied = catch_unwind(AssertUnwindSafe(|| {
            Update::decode_v1(&e.update)
                .map_err(|err| err.to_string())
                .and_then(|u| txn.apply_update(u).map_err(|err| err.to_string()))
        }));
        match applied {
            Ok(Ok(())) => {
                // yrs's `Update::state_vector` only counts updates that start at clock 0, so
                // the reach comes from our own walk of the entry: the one this node's write
                // door made, when the entry carries it, else a new one.
                let clock = |end: u64| u32::try_from(end).unwrap_or(u32::MAX);
                match e.reach.as_ref().and_then(|r| r.of(&e.update)) {
                    Some(ends) => {
                        grown.extend(ends.iter().map(|&(c, end)| (ClientID::new(c), clock(end))))
                    }
                    None => match crate::validate::scan_update(&e.update) {
                        Ok(deps) => {
                            grown.extend(deps.ends().map(|(c, end)| (ClientID::new(c), clock(end))))
                        }
                        Err(_) => return Reach::Unknown,
                    },
                }
            }
            // Entries are validated before they are appended, so this means a yrs bug or a
            // log written by something else. The node keeps serving; the entry's position
            // still counts as passed so positions stay meaningful.
            Ok(Err(err)) => {
                tracing::error!(doc = %self.doc, id = %e.id, error = %err, "log entry did not apply")
            }
            Err(_) => {
                tracing::error!(doc = %self.doc, id = %e.id, "log entry made yrs panic; skipped")
            }
        }
        Reach::Told
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
        self.fan_out_all(&fresh);
        self.note_edits(!fresh.is_empty());
        self.wake_waiters();
        self.maybe_compact().await;
    }

    /// Fans out one turn's fresh entries, under one budget of direct writes.
    fn fan_out_all(&self, fresh: &[Entry]) {
        let mut direct_left = MAX_DIRECT_PER_TURN;
        for e in fresh {
            self.fan_out(e, &mut direct_left);
        }
    }

    /// Hands `e` to every subscriber: written to its socket at once where nothing is queued
    /// for it (at most `direct_left` such writes; past that the connections' writers do it).
    /// Each wire in use encodes the entry once, when its first recipient comes up; the rest
    /// of that wire's recipients share the bytes.
    fn fan_out(&self, e: &Entry, direct_left: &mut usize) {
        let started = std::time::Instant::now();
        let position = Position::new(self.epoch, e.id);
        let mut frames: [Option<Bytes>; MAX_WIRES] = Default::default();
        let own = e.origin.filter(|o| o.node == self.shared.node);
        for (conn, sub) in &self.subs {
            if let Some(o) = own.filter(|o| o.conn == *conn) {
                sub.outbox.push_own(&self.doc, o.seq, position);
                continue;
            }
            let frame = frames[sub.outbox.wire_id().index()]
                .get_or_insert_with(|| sub.outbox.wire.update(&self.doc, &e.update, position))
                .clone();
            if sub.outbox.push_update(
                &self.doc,
                frame,
                e.update.clone(),
                position,
                *direct_left > 0,
            ) {
                *direct_left -= 1;
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
            Command::Diff { conn, state_vector } => self.send_diff(conn, &state_vector),
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
            Command::Inspect { reply } => {
                let _ = reply.send(self.facts());
            }
        }
    }

    fn subscribe(&mut self, sub: Subscriber, from: SyncFrom) {
        let conn = sub.conn;
        let join = sub.outbox.wire.join();
        self.add_sub(sub);
        match join {
            Join::Offer(offer) if from.position.is_none() && from.state_vector.is_none() => {
                self.send_offer(conn, offer)
            }
            _ => self.send_sync(conn, &from),
        }
        self.send_awareness_snapshot(conn);
    }

    /// Offers our state vector (see [`Join::Offer`]): the client answers with what we miss
    /// and asks for what it lacks, and that answer carries the document. The offer has no
    /// content, so it moves no position.
    fn send_offer(&self, conn: u64, offer: fn(&DocId, &[u8]) -> Bytes) {
        let sv = self.awareness.doc().transact().state_vector();
        if let Some(sub) = self.subs.get(&conn) {
            sub.outbox
                .push_frame(&self.doc, offer(&self.doc, &sv.encode_v1()));
        }
    }

    fn add_sub(&mut self, sub: Subscriber) {
        let conn = sub.conn;
        sub.outbox.attach(&self.doc, self.handle.clone());
        // Re-subscribing on the same socket keeps the presence it introduced: those ids are
        // still its own (`awareness_owner` says so), and its leave must still clear them.
        let awareness_ids = match self.subs.remove(&conn) {
            Some(old) => old.awareness_ids,
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

    fn unsubscribe(&mut self, conn: u64) {
        let Some(sub) = self.subs.remove(&conn) else {
            return;
        };
        sub.outbox.detach(&self.doc);
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
