//! Fan-out end of a document (data-flow step 6): what waits for one connection, merged.
//!
//! Documents push already-encoded frames (built once per entry, shared by every recipient)
//! together with the raw update. While a connection keeps up, the shared frame goes out as is.
//! When it falls behind, what waits for a document is merged at drain time in one batch — all
//! pending updates in a single `merge_updates_v1` call, not pairwise on arrival — and
//! awareness keeps only the newest state per client. Nothing is lost: the document has every
//! update, and positions only ever move forward on the wire.
//!
//! Every kind of frame is bounded, because a client can make the node produce any of them:
//! - a sync answer (a `synced` catch-up or a y-websocket sync step 2) waits at most once per
//!   document: a newer answer replaces it together with every update queued before it (the
//!   answer is built later, from a document that already holds them);
//! - updates past the byte budget are dropped, and the document is asked to bring the
//!   connection up to date from the last position it was sent, once it drains;
//! - awareness merges to the newest state per client; past the budget it is dropped too and an
//!   awareness snapshot is owed instead;
//! - error frames count toward the budget and their number is capped.
//!
//! An answer is never dropped for the budget (a document larger than the budget must still
//! reach its client), so an outbox can stand over budget while one waits. The connection
//! stops reading its client's requests until the outbox is back under budget
//! ([`Outbox::room`]): a client that asks for the document again and again without reading
//! costs one copy of it, not one per request.
//!
//! Write first, queue only when the socket is full: a WebSocket outbox has a [`DirectSocket`].
//! When nothing is queued or being written for a document, a push writes its frame to the
//! socket at once from the pushing task (the document's owner, usually) and nothing is queued,
//! so the connection's writer task is not woken at all. A short write leaves the rest of the
//! frame (a slice of the shared bytes, not a copy) in front of everything else; `WouldBlock`
//! queues the item as before. Once something is queued for a document, everything for it
//! queues until the writer has written it all, so positions reach the socket in log order.

use super::{ConnId, DocHandle};
use bytes::Bytes;
use chorus_protocol::{CloseCode, DocId, Position, encode};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

/// A socket the outbox may write to without waiting (implemented in `connection/`). Calls
/// are made with the outbox's lock held, so they must never block: one non-blocking write.
pub trait DirectSocket: Send + Sync {
    /// Writes one message (a protocol payload; the socket frames it) if the socket takes it.
    fn try_send(&self, payload: &Bytes) -> Sent;
    /// Writes bytes the socket framed already (the rest of a short write, a ping).
    fn try_send_raw(&self, raw: &Bytes) -> Sent;
}

/// How a direct write went.
pub enum Sent {
    All,
    /// Part went out: these framed bytes must follow before anything else.
    Partial(Vec<Bytes>),
    /// The socket takes nothing now.
    Blocked,
    /// Not for a direct write (a payload the writer sends in pieces): queue it.
    Later,
    /// The socket is broken; the writer finds out and ends the connection.
    Failed,
}

/// Which wire protocol a connection speaks; decides how merged items are re-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Native,
    /// y-websocket (`/y/{doc}`).
    Yjs,
}

enum Item {
    /// Sent as is and carries no document content, so it moves no position (y-websocket's
    /// sync step 1, which only offers our state vector).
    Frame(Bytes),
    /// Brings the client to `position` with content: a `synced` catch-up or a y-websocket
    /// sync step 2. At most one per document.
    Answer(Bytes, Position),
    /// A log entry from someone else.
    Update {
        frame: Bytes,
        update: Bytes,
        position: Position,
    },
    /// The connection's own entry: becomes an `ack` (native) or nothing (y-websocket).
    Own {
        seq: Option<u64>,
        position: Position,
    },
}

/// What an owed ack costs the budget (the frame it becomes is about this big).
const ACK_COST: usize = 32;

impl Item {
    fn cost(&self) -> usize {
        match self {
            Item::Frame(f) | Item::Answer(f, _) => f.len(),
            Item::Update { frame, update, .. } => frame.len() + update.len(),
            Item::Own { .. } => ACK_COST,
        }
    }

    fn is_update(&self) -> bool {
        matches!(self, Item::Update { .. } | Item::Own { .. })
    }
}

#[derive(Default)]
struct DocQueue {
    items: VecDeque<Item>,
    awareness: Vec<(Bytes, Bytes)>,
    /// Bytes of `awareness`.
    awareness_bytes: usize,
    /// Pending awareness was dropped for the budget: the document owes a snapshot of it.
    awareness_owed: bool,
    /// Awareness is sent to this connection no sooner than this (the per-connection cap).
    next_awareness: Option<Instant>,
    /// Position of the last thing with content handed to the socket for this document.
    sent: Option<Position>,
    /// Pending updates were dropped; waiting for the document's catch-up.
    resync: Resync,
    /// Acks owed for own entries dropped or arrived while resyncing.
    owed_acks: Vec<Option<u64>>,
    handle: Option<DocHandle>,
}

impl DocQueue {
    fn is_idle(&self) -> bool {
        self.items.is_empty() && self.awareness.is_empty()
    }

    /// Bytes this queue holds toward the budget.
    fn cost(&self) -> usize {
        self.items.iter().map(Item::cost).sum::<usize>()
            + self.awareness_bytes
            + self.owed_acks.len() * ACK_COST
    }
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Resync {
    #[default]
    No,
    /// Dropped; the writer must ask the document for a catch-up.
    Needed,
    /// Asked; updates are ignored until the catch-up arrives.
    Requested,
}

#[derive(Default)]
struct State {
    /// Boxed: a map allocates room for several entries at once, and most connections hold
    /// one document (this is per idle connection memory).
    docs: HashMap<DocId, Box<DocQueue>>,
    /// Documents with something pending, in the order they first had it.
    ready: VecDeque<DocId>,
    bytes: usize,
    control: VecDeque<Bytes>,
    close: Option<CloseCode>,
    closed: bool,
    /// Something was pushed since the writer last drained and the writer was told. Later
    /// pushes don't notify again: one wake per drain, however many updates arrive meanwhile.
    told: bool,
    /// Waiting for the node's flush tick (see `hold`).
    held: bool,
    /// Framed bytes to write before anything else: the rest of a short direct write, the
    /// replies tungstenite owes (pongs), pings.
    raw: Vec<Bytes>,
    /// The writer took frames and is writing them: no direct write may go in between.
    writing: bool,
    /// Set once the connection's socket is up (never for SSE and long-polls, nor with
    /// `--flush-interval`, which batches on purpose); dropped at close.
    socket: Option<Arc<dyn DirectSocket>>,
}

impl State {
    /// Whether nothing is queued or being written on the socket as a whole, so a frame may be
    /// written directly (the document's own queue is checked by the caller).
    fn socket_idle(&self) -> bool {
        self.socket.is_some()
            && !self.writing
            && !self.held
            && !self.closed
            && self.close.is_none()
            && self.raw.is_empty()
            && self.control.is_empty()
    }
}

impl State {
    fn mark_ready(&mut self, doc: &DocId) {
        if !self.ready.contains(doc) {
            self.ready.push_back(doc.clone());
        }
    }
}

/// What a drain produced, in send order, and what the documents must be asked for.
pub struct Drained {
    /// Already framed: written first, as they are.
    pub raw: Vec<Bytes>,
    pub frames: Vec<Bytes>,
    /// Documents to ask for a catch-up, from the given position (None: whole state).
    pub resync: Vec<(DocHandle, Option<Position>)>,
    /// Documents whose awareness was dropped for the budget: ask for a snapshot of it.
    pub awareness: Vec<DocHandle>,
    pub close: Option<CloseCode>,
    /// Awareness held back by the rate cap: drain again at this time.
    pub wake_at: Option<Instant>,
}

impl Drained {
    /// Asks the documents for what this drain owes the connection (catch-ups, awareness
    /// snapshots). Every drain loop calls this after each drain.
    pub async fn request_owed(&mut self, conn: ConnId) {
        for (handle, from) in self.resync.drain(..) {
            metrics::counter!(crate::metrics::names::RESYNCS).increment(1);
            Box::pin(handle.resync(conn, from)).await;
        }
        for handle in self.awareness.drain(..) {
            let _ = Box::pin(handle.query_awareness(conn)).await;
        }
    }
}

/// Limits of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Bytes that may wait before pending updates are dropped for a catch-up.
    pub budget: usize,
    /// Least time between two awareness frames for one document on this connection.
    pub awareness_interval: Duration,
}

/// Node-wide outbox counters (for stats and metrics).
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Times an outbox went over budget and dropped pending updates for a catch-up.
    pub sheds: AtomicU64,
    /// Frames that carried several merged updates.
    pub merged_frames: AtomicU64,
    /// Updates that went out inside merged frames.
    pub merged_updates: AtomicU64,
    /// Sync answers replaced by a newer one before they were sent.
    pub replaced_answers: AtomicU64,
    /// Connections right now in their last grace period before a 4001 close.
    pub stalled: AtomicU64,
    /// Connections closed (or dropped) for not reading.
    pub slow_closes: AtomicU64,
    /// Socket writes (flushes) that carried drained frames.
    pub writes: AtomicU64,
    /// Frames those writes carried (frames / writes > 1: several went out in one write).
    pub frames_written: AtomicU64,
    /// Frames written straight to the socket by the task that had them (no writer wake).
    pub direct_writes: AtomicU64,
    /// Direct writes the socket took only part of (the writer wrote the rest).
    pub short_writes: AtomicU64,
}

pub struct Outbox {
    pub conn: ConnId,
    pub proto: Proto,
    limits: OutboxLimits,
    stats: Arc<OutboxStats>,
    state: Mutex<State>,
    notify: Notify,
    /// Woken when a drain or a close brings the outbox back under budget (see [`Outbox::room`]).
    room: Notify,
}

/// Direct writes one owner turn may make before the rest of a fan-out is queued for the
/// connections' writers: a 10k-reader room does not hold its owner for 10k writes.
pub const MAX_DIRECT_PER_TURN: usize = 2_048;

/// Pending updates for one document from which a drain merges them into one (a connection
/// that fell behind); fewer go out as the shared frames.
pub const MERGE_FROM: usize = 8;

/// Most error frames queued for one connection; a client producing more than this before
/// reading any is misbehaving and gets closed.
const MAX_CONTROL: usize = 64;

/// Raw awareness updates kept for one document before they are merged into one (newest state
/// per client): awareness stays bounded by the number of clients, not of messages.
const AWARENESS_MERGE_FROM: usize = 16;

impl Outbox {
    pub fn new(conn: ConnId, proto: Proto, limits: OutboxLimits, stats: Arc<OutboxStats>) -> Self {
        Outbox {
            conn,
            proto,
            limits,
            stats,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            room: Notify::new(),
        }
    }

    /// From now on pushes may write to `socket` directly.
    pub fn attach_socket(&self, socket: Arc<dyn DirectSocket>) {
        self.lock().socket = Some(socket);
    }

    /// Writes `payload` (or framed `raw`) now if nothing is queued before it. `None`: not
    /// written, queue it. `Some(true)`: all of it went; `Some(false)`: part went, and the rest
    /// now waits in `raw` for the writer (who was told).
    fn try_direct(&self, s: &mut State, payload: &Bytes, raw: bool) -> Option<bool> {
        if !s.socket_idle() {
            return None;
        }
        let socket = s.socket.as_deref()?;
        let sent = if raw {
            socket.try_send_raw(payload)
        } else {
            socket.try_send(payload)
        };
        match sent {
            Sent::All => {
                self.count_direct(payload.len());
                Some(true)
            }
            Sent::Partial(rest) => {
                self.count_direct(payload.len());
                self.stats.short_writes.fetch_add(1, Ordering::Relaxed);
                s.bytes += rest.iter().map(Bytes::len).sum::<usize>();
                s.raw.extend(rest);
                Some(false)
            }
            Sent::Blocked | Sent::Later | Sent::Failed => None,
        }
    }

    fn count_direct(&self, bytes: usize) {
        self.stats.direct_writes.fetch_add(1, Ordering::Relaxed);
        let hot = crate::metrics::hot();
        hot.frames_out.increment(1);
        hot.bytes_out.increment(bytes as u64);
    }

    /// Queues framed bytes (a ping, tungstenite's pong) in front of every queued frame, or
    /// writes them at once when nothing is being written.
    pub fn push_raw(&self, raw: Bytes) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        match self.try_direct(&mut s, &raw, true) {
            Some(true) => {}
            Some(false) => self.tell(s),
            None => {
                s.bytes += raw.len();
                s.raw.push(raw);
                self.tell(s);
            }
        }
    }

    /// The framed bytes that must go first (the writer's last words before it ends).
    pub fn take_raw(&self) -> Vec<Bytes> {
        let mut s = self.lock();
        let raw = std::mem::take(&mut s.raw);
        s.bytes = s.bytes.saturating_sub(raw.iter().map(Bytes::len).sum());
        raw
    }

    /// The framed bytes at the front of what must go first, as long as `take` accepts them
    /// (the writer, between two fragments of a long message, takes pings and pongs).
    pub fn take_raw_while(&self, take: impl Fn(&Bytes) -> bool) -> Vec<Bytes> {
        let mut s = self.lock();
        let n = s.raw.iter().take_while(|r| take(r)).count();
        let raw: Vec<Bytes> = s.raw.drain(..n).collect();
        s.bytes = s.bytes.saturating_sub(raw.iter().map(Bytes::len).sum());
        raw
    }

    /// The writer wrote everything it took: direct writes may go again.
    pub fn finish_write(&self) {
        self.lock().writing = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until there is something to drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Whether more bytes wait than the budget allows: the connection reads no more of its
    /// client's requests until this is false again.
    pub fn over_budget(&self) -> bool {
        let s = self.lock();
        !s.closed && s.bytes > self.limits.budget
    }

    /// Resolves once the outbox is under budget (or closed).
    pub async fn room(&self) {
        loop {
            let drained = self.room.notified();
            tokio::pin!(drained);
            // Registered before the check, so a drain between the two still wakes us.
            drained.as_mut().enable();
            if !self.over_budget() {
                return;
            }
            drained.await;
        }
    }

    /// Holds the writer until the node's next flush tick (`--flush-interval`): pushes don't
    /// wake it meanwhile; close requests and error frames still do. Returns whether it was
    /// not held already, i.e. whether the caller must register it for the tick.
    pub fn hold(&self) -> bool {
        let mut s = self.lock();
        s.told = true;
        !std::mem::replace(&mut s.held, true)
    }

    pub fn is_held(&self) -> bool {
        self.lock().held
    }

    /// The flush tick: the writer drains what gathered while it was held.
    pub fn release(&self) {
        let mut s = self.lock();
        s.held = false;
        if s.ready.is_empty() && s.control.is_empty() && s.close.is_none() {
            // Nothing gathered: no wake now, and the next push wakes the writer at once, as
            // after any quiet spell.
            s.told = false;
            return;
        }
        drop(s);
        self.notify.notify_one();
    }

    /// A close or an error frame is waiting: the writer sends it without holding for the
    /// flush interval.
    pub fn urgent(&self) -> bool {
        let s = self.lock();
        s.close.is_some() || !s.control.is_empty()
    }

    /// Bytes waiting right now (for stats and tests).
    pub fn pending_bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn attach(&self, doc: &DocId, handle: DocHandle) {
        let mut s = self.lock();
        s.docs.entry(doc.clone()).or_default().handle = Some(handle);
    }

    pub fn detach(&self, doc: &DocId) {
        let mut s = self.lock();
        if let Some(q) = s.docs.remove(doc) {
            s.bytes = s.bytes.saturating_sub(q.cost());
        }
        s.ready.retain(|d| d != doc);
        drop(s);
        self.room.notify_waiters();
    }

    /// Marks the outbox closed: later pushes are dropped (the connection is gone).
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.docs.clear();
        s.ready.clear();
        s.control.clear();
        s.raw.clear();
        s.socket = None;
        s.bytes = 0;
        drop(s);
        self.room.notify_waiters();
    }

    /// Whether a close was asked for: the connection is ending, and nothing more its client
    /// sends is acted on.
    pub fn close_requested(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Asks the writer to close the socket with `code` after what is already queued.
    pub fn request_close(&self, code: CloseCode) {
        self.lock().close.get_or_insert(code);
        self.notify.notify_one();
    }

    /// Queues a connection-level frame (an error). Returns false if too many are waiting.
    pub fn push_control(&self, frame: Bytes) -> bool {
        let mut s = self.lock();
        if s.closed {
            return true;
        }
        if s.control.len() >= MAX_CONTROL {
            return false;
        }
        match self.try_direct(&mut s, &frame, false) {
            Some(true) => return true,
            Some(false) => {
                self.tell(s);
                return true;
            }
            None => {}
        }
        s.bytes += frame.len();
        s.control.push_back(frame);
        drop(s);
        self.notify.notify_one();
        true
    }

    /// Wakes the writer once per drain, however many pushes arrive meanwhile.
    fn tell(&self, mut s: std::sync::MutexGuard<'_, State>) {
        let tell = !std::mem::replace(&mut s.told, true);
        drop(s);
        if tell {
            self.notify.notify_one();
        }
    }

    /// Queues `item`, or writes it at once (see the module docs) when `allow_direct` and
    /// nothing waits before it; returns whether it was written directly.
    fn push(&self, doc: &DocId, item: Item, allow_direct: bool) -> bool {
        let mut s = self.lock();
        if s.closed {
            return false;
        }
        if allow_direct
            && s.socket_idle()
            && s.docs
                .get(doc)
                .is_none_or(|q| q.items.is_empty() && q.resync == Resync::No)
            && let Some(done) = self.push_direct(&mut s, doc, &item)
        {
            if !done {
                self.tell(s);
            }
            return true;
        }
        let cost = item.cost();
        let State {
            docs, ready, bytes, ..
        } = &mut *s;
        let q = docs.entry(doc.clone()).or_default();
        if q.resync != Resync::No {
            // Covered by the catch-up on its way; only remember acks owed.
            if let Item::Own { seq, .. } = item {
                q.owed_acks.push(seq);
                *bytes += ACK_COST;
            }
            return false;
        }
        if q.is_idle() {
            ready.push_back(doc.clone());
        }
        q.items.push_back(item);
        *bytes += cost;
        if s.bytes > self.limits.budget {
            self.shed(&mut s);
        }
        self.tell(s);
        false
    }

    /// Writes one item straight to the socket (see [`Outbox::try_direct`]) and records the
    /// position it brings the client to. `None`: the socket took none of it.
    fn push_direct(&self, s: &mut State, doc: &DocId, item: &Item) -> Option<bool> {
        let (payload, position) = match item {
            Item::Update {
                frame, position, ..
            } => (Some(frame.clone()), Some(*position)),
            // y-websocket has no acks: its own entry only moves the position.
            Item::Own { seq, position } => (
                (self.proto == Proto::Native).then(|| ack_frame(doc, *seq, *position)),
                Some(*position),
            ),
            Item::Frame(f) => (Some(f.clone()), None),
            Item::Answer(f, p) => (Some(f.clone()), Some(*p)),
        };
        let done = match payload {
            Some(p) => self.try_direct(s, &p, false)?,
            None => true,
        };
        if let Some(p) = position {
            s.docs.entry(doc.clone()).or_default().sent = Some(p);
        }
        Some(done)
    }

    /// Writes what waits at the front of `doc`'s queue directly while the socket takes it
    /// whole and nothing else is queued before it.
    fn send_front(&self, s: &mut State, doc: &DocId) -> bool {
        let mut told = false;
        while s.socket_idle() {
            let Some(item) = s.docs.get_mut(doc).and_then(|q| q.items.pop_front()) else {
                break;
            };
            match self.push_direct(s, doc, &item) {
                Some(done) => {
                    s.bytes = s.bytes.saturating_sub(item.cost());
                    if !done {
                        told = true;
                        break;
                    }
                }
                None => {
                    if let Some(q) = s.docs.get_mut(doc) {
                        q.items.push_front(item);
                    }
                    break;
                }
            }
        }
        if s.docs.get(doc).is_some_and(|q| q.is_idle()) {
            s.ready.retain(|d| d != doc);
        }
        told
    }

    /// Over budget: drop every pending update and owe each document a catch-up instead; if
    /// that is not enough, drop pending awareness too and owe a snapshot of it. Answers and
    /// error frames stay (see the module docs).
    fn shed(&self, s: &mut State) {
        let mut freed = 0;
        let mut owed = Vec::new();
        for (doc, q) in s.docs.iter_mut() {
            if !q.items.iter().any(Item::is_update) {
                continue;
            }
            let mut kept = VecDeque::with_capacity(q.items.len());
            for item in q.items.drain(..) {
                match item {
                    Item::Own { seq, .. } => {
                        // Still owed, and still counted (as an owed ack).
                        q.owed_acks.push(seq);
                    }
                    Item::Update { .. } => freed += item.cost(),
                    other => kept.push_back(other),
                }
            }
            q.items = kept;
            q.resync = Resync::Needed;
            owed.push(doc.clone());
        }
        s.bytes = s.bytes.saturating_sub(freed);
        if s.bytes > self.limits.budget {
            for (doc, q) in s.docs.iter_mut() {
                if q.awareness.is_empty() {
                    continue;
                }
                freed += q.awareness_bytes;
                s.bytes = s.bytes.saturating_sub(q.awareness_bytes);
                q.awareness.clear();
                q.awareness_bytes = 0;
                q.awareness_owed = true;
                owed.push(doc.clone());
            }
        }
        for doc in owed {
            s.mark_ready(&doc);
        }
        self.stats.sheds.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            conn = self.conn,
            freed,
            "outbox over budget: pending updates dropped, catch-up owed"
        );
    }

    /// A sync answer or catch-up: the client is at `position` once it has `frame`. Replaces an
    /// answer still waiting for this document, and every update queued before it: the answer
    /// comes from a document that already holds them.
    pub fn push_synced(&self, doc: &DocId, frame: Bytes, position: Position) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        let q = s.docs.entry(doc.clone()).or_default();
        q.resync = Resync::No;
        let mut acks = std::mem::take(&mut q.owed_acks);
        let mut freed = acks.len() * ACK_COST;
        let mut replaced = 0;
        let mut kept = VecDeque::with_capacity(q.items.len() + 1);
        for item in q.items.drain(..) {
            match item {
                Item::Frame(_) => kept.push_back(item),
                Item::Own { seq, .. } => {
                    freed += item.cost();
                    acks.push(seq);
                }
                Item::Answer(..) => {
                    replaced += 1;
                    freed += item.cost();
                }
                Item::Update { .. } => freed += item.cost(),
            }
        }
        let added = frame.len() + acks.len() * ACK_COST;
        kept.push_back(Item::Answer(frame, position));
        kept.extend(acks.into_iter().map(|seq| Item::Own { seq, position }));
        q.items = kept;
        s.mark_ready(doc);
        if replaced > 0 {
            self.stats
                .replaced_answers
                .fetch_add(replaced, Ordering::Relaxed);
        }
        s.bytes = s.bytes.saturating_sub(freed) + added;
        let short = self.send_front(&mut s, doc);
        if short || s.ready.contains(doc) {
            self.tell(s);
        }
    }

    /// A frame without document content (y-websocket's sync step 1).
    pub fn push_frame(&self, doc: &DocId, frame: Bytes) {
        self.push(doc, Item::Frame(frame), true);
    }

    /// Someone else's log entry; returns whether it was written directly (the fan-out counts
    /// them against [`MAX_DIRECT_PER_TURN`] and passes `allow_direct: false` past it).
    pub fn push_update(
        &self,
        doc: &DocId,
        frame: Bytes,
        update: Bytes,
        position: Position,
        allow_direct: bool,
    ) -> bool {
        self.push(
            doc,
            Item::Update {
                frame,
                update,
                position,
            },
            allow_direct,
        )
    }

    pub fn push_own(&self, doc: &DocId, seq: Option<u64>, position: Position) {
        self.push(doc, Item::Own { seq, position }, true);
    }

    /// Awareness: `frame` is the encoded message, `update` the raw awareness update used when
    /// several are waiting and get merged (newest state per client wins).
    pub fn push_awareness(&self, doc: &DocId, frame: Bytes, update: Bytes) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        let now = Instant::now();
        if s.socket_idle()
            && s.docs
                .get(doc)
                .is_none_or(|q| q.awareness.is_empty() && q.next_awareness.is_none_or(|t| t <= now))
            && let Some(done) = self.try_direct(&mut s, &frame, false)
        {
            s.docs.entry(doc.clone()).or_default().next_awareness =
                Some(now + self.limits.awareness_interval);
            if !done {
                self.tell(s);
            }
            return;
        }
        let cost = frame.len() + update.len();
        let State {
            docs, ready, bytes, ..
        } = &mut *s;
        let q = docs.entry(doc.clone()).or_default();
        if q.is_idle() {
            ready.push_back(doc.clone());
        }
        q.awareness.push((frame, update));
        q.awareness_bytes += cost;
        *bytes += cost;
        if q.awareness.len() > AWARENESS_MERGE_FROM {
            let merged = merge_awareness(q.awareness.iter().map(|(_, u)| u));
            let frame = awareness_frame(self.proto, doc, &merged);
            let merged_cost = frame.len() + merged.len();
            *bytes = bytes.saturating_sub(q.awareness_bytes) + merged_cost;
            q.awareness = vec![(frame, Bytes::from(merged))];
            q.awareness_bytes = merged_cost;
        }
        if s.bytes > self.limits.budget {
            self.shed(&mut s);
        }
        self.tell(s);
    }

    /// Takes everything waiting, merging per document. Merging runs here, in the connection's
    /// writer task, outside the lock: a slow connection pays for its own merges.
    pub fn drain(&self) -> Drained {
        let mut taken = Vec::new();
        let mut resync = Vec::new();
        let mut awareness_owed = Vec::new();
        let mut wake_at: Option<Instant> = None;
        let now = Instant::now();
        let (raw, control, close, was_over) = {
            let mut s = self.lock();
            s.told = false;
            // Until `finish_write`: what is taken now must reach the socket before any
            // direct write.
            s.writing = s.socket.is_some();
            let raw = std::mem::take(&mut s.raw);
            let mut freed = raw.iter().map(Bytes::len).sum::<usize>();
            let was_over = s.bytes > self.limits.budget;
            let ready = std::mem::take(&mut s.ready);
            let mut deferred = Vec::new();
            for doc in ready {
                let Some(q) = s.docs.get_mut(&doc) else {
                    continue;
                };
                let items = std::mem::take(&mut q.items);
                if q.resync == Resync::Needed {
                    q.resync = Resync::Requested;
                    // From what the socket really gets: an answer kept through the shed goes
                    // out in this very drain.
                    let from = items
                        .iter()
                        .rev()
                        .find_map(|i| match i {
                            Item::Answer(_, p) => Some(*p),
                            _ => None,
                        })
                        .or(q.sent);
                    if let Some(h) = &q.handle {
                        resync.push((h.clone(), from));
                    }
                }
                if std::mem::take(&mut q.awareness_owed)
                    && let Some(h) = &q.handle
                {
                    awareness_owed.push(h.clone());
                }
                freed += items.iter().map(Item::cost).sum::<usize>();
                let awareness = if q.awareness.is_empty() {
                    Vec::new()
                } else if q.next_awareness.is_some_and(|t| t > now) {
                    // Over the awareness rate: hold it (it keeps merging, newest state wins).
                    let t = q.next_awareness.unwrap_or(now);
                    wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
                    deferred.push(doc.clone());
                    Vec::new()
                } else {
                    q.next_awareness = Some(now + self.limits.awareness_interval);
                    freed += std::mem::take(&mut q.awareness_bytes);
                    std::mem::take(&mut q.awareness)
                };
                taken.push((doc, items, awareness));
            }
            s.ready.extend(deferred);
            let control = std::mem::take(&mut s.control);
            freed += control.iter().map(Bytes::len).sum::<usize>();
            s.bytes = s.bytes.saturating_sub(freed);
            (raw, control, s.close, was_over)
        };
        if was_over {
            self.room.notify_waiters();
        }
        let mut frames: Vec<Bytes> = control.into_iter().collect();
        let mut sent = Vec::new();
        for (doc, items, awareness) in taken {
            let last = self.encode_items(&doc, items, &mut frames);
            if let Some(p) = last {
                sent.push((doc.clone(), p));
            }
            match awareness.len() {
                0 => {}
                1 => frames.extend(awareness.into_iter().map(|(f, _)| f)),
                _ => {
                    let merged = merge_awareness(awareness.iter().map(|(_, u)| u));
                    frames.push(awareness_frame(self.proto, &doc, &merged));
                }
            }
        }
        if !sent.is_empty() {
            let mut s = self.lock();
            for (doc, p) in sent {
                if let Some(q) = s.docs.get_mut(&doc) {
                    q.sent = Some(p);
                }
            }
        }
        Drained {
            raw,
            frames,
            resync,
            awareness: awareness_owed,
            close,
            wake_at,
        }
    }

    /// Encodes one document's pending items; returns the last position they bring it to.
    fn encode_items(
        &self,
        doc: &DocId,
        items: VecDeque<Item>,
        out: &mut Vec<Bytes>,
    ) -> Option<Position> {
        let mut last = None;
        let mut run: Vec<Item> = Vec::new();
        for item in items {
            match item {
                Item::Frame(frame) => {
                    self.flush_run(doc, &mut run, out, &mut last);
                    out.push(frame);
                }
                Item::Answer(frame, position) => {
                    self.flush_run(doc, &mut run, out, &mut last);
                    out.push(frame);
                    last = Some(position);
                }
                other => run.push(other),
            }
        }
        self.flush_run(doc, &mut run, out, &mut last);
        last
    }

    fn flush_run(
        &self,
        doc: &DocId,
        run: &mut Vec<Item>,
        out: &mut Vec<Bytes>,
        last: &mut Option<Position>,
    ) {
        if run.is_empty() {
            return;
        }
        let mut updates: Vec<(Bytes, Bytes, Position)> = Vec::new();
        let mut acks = Vec::new();
        let mut run_last = None;
        for item in run.drain(..) {
            match item {
                Item::Update {
                    frame,
                    update,
                    position,
                } => {
                    run_last = Some(position);
                    updates.push((frame, update, position));
                }
                Item::Own { seq, position } => {
                    run_last = Some(position);
                    acks.push(seq);
                }
                Item::Frame(..) | Item::Answer(..) => {}
            }
        }
        match updates.len() {
            0 => {}
            // A connection that keeps up (a few updates held by the flush interval) gets the
            // frames built once for everyone: merging per recipient would redo the same work
            // for each of them.
            n if n < MERGE_FROM => out.extend(updates.drain(..).map(|(f, _, _)| f)),
            _ => {
                let position = updates.last().map(|u| u.2);
                let merged = yrs::merge_updates_v1(updates.iter().map(|(_, u, _)| u.as_ref()));
                match (merged, position) {
                    (Ok(merged), Some(position)) => {
                        self.stats.merged_frames.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .merged_updates
                            .fetch_add(updates.len() as u64, Ordering::Relaxed);
                        out.push(update_frame(self.proto, doc, &merged, position))
                    }
                    // Entries in the log were validated, so this does not happen; if it did,
                    // sending them one by one is still correct.
                    _ => out.extend(updates.drain(..).map(|(f, _, _)| f)),
                }
            }
        }
        if let Some(position) = run_last {
            if self.proto == Proto::Native {
                for seq in acks {
                    out.push(ack_frame(doc, seq, position));
                }
            }
            *last = Some(position);
        }
    }
}

/// Merges raw awareness updates: per client the highest clock wins; on a tie a removal wins.
pub fn merge_awareness<'a>(updates: impl Iterator<Item = &'a Bytes>) -> Vec<u8> {
    let mut merged = AwarenessUpdate {
        clients: HashMap::new(),
    };
    for u in updates {
        let Ok(u) = AwarenessUpdate::decode_v1(u) else {
            continue;
        };
        for (id, entry) in u.clients {
            match merged.clients.get(&id) {
                Some(have) if have.clock > entry.clock => {}
                Some(have) if have.clock == entry.clock && &*entry.json != "null" => {}
                _ => {
                    merged.clients.insert(id, entry);
                }
            }
        }
    }
    merged.encode_v1()
}

pub fn update_frame(proto: Proto, doc: &DocId, update: &[u8], position: Position) -> Bytes {
    match proto {
        Proto::Native => Bytes::from(encode::update(doc.as_str(), update, position)),
        Proto::Yjs => Bytes::from(chorus_protocol::y_websocket::sync_update(update)),
    }
}

pub fn awareness_frame(proto: Proto, doc: &DocId, update: &[u8]) -> Bytes {
    match proto {
        Proto::Native => Bytes::from(encode::awareness(doc.as_str(), update)),
        Proto::Yjs => Bytes::from(chorus_protocol::y_websocket::awareness(update)),
    }
}

fn ack_frame(doc: &DocId, seq: Option<u64>, position: Position) -> Bytes {
    let frame = chorus_protocol::ServerFrame::Ack {
        doc: doc.to_string(),
        seq,
        position,
    };
    Bytes::from(frame.encode().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_protocol::StreamId;
    use yrs::{ReadTxn, Text, Transact};

    fn outbox(budget: usize) -> Outbox {
        Outbox::new(
            1,
            Proto::Native,
            OutboxLimits {
                budget,
                awareness_interval: Duration::from_millis(100),
            },
            Arc::new(OutboxStats::default()),
        )
    }

    fn updates(n: usize, size: usize) -> Vec<Bytes> {
        let doc = yrs::Doc::new();
        let text = doc.get_or_insert_text("t");
        (0..n)
            .map(|i| {
                let before = doc.transact().state_vector();
                text.insert(
                    &mut doc.transact_mut(),
                    0,
                    &format!("{i}{}", "x".repeat(size)),
                );
                Bytes::from(doc.transact().encode_state_as_update_v1(&before))
            })
            .collect()
    }

    fn pos(seq: u64) -> Position {
        Position::new(1, StreamId::new(1, seq))
    }

    #[test]
    fn a_connection_that_keeps_up_gets_the_shared_frames_as_they_are() {
        let o = outbox(1 << 20);
        let doc = DocId::parse("d").expect("id");
        let u = updates(1, 10).remove(0);
        let frame = update_frame(Proto::Native, &doc, &u, pos(1));
        o.push_update(&doc, frame.clone(), u, pos(1), true);
        let d = o.drain();
        assert_eq!(
            d.frames,
            vec![frame],
            "the very bytes built once for every recipient"
        );
        assert_eq!(o.pending_bytes(), 0);
    }

    #[test]
    fn a_held_writer_is_woken_by_a_close_but_not_by_updates() {
        use futures_util::FutureExt;
        let o = outbox(1 << 20);
        let doc = DocId::parse("d").expect("id");
        let push = |seq| {
            let u = updates(1, 10).remove(0);
            o.push_update(
                &doc,
                update_frame(Proto::Native, &doc, &u, pos(seq)),
                u,
                pos(seq),
                true,
            );
        };
        push(1);
        assert!(
            o.ready().now_or_never().is_some(),
            "a push wakes the writer"
        );
        assert_eq!(o.drain().frames.len(), 1);

        assert!(o.hold(), "the first hold registers for the tick");
        assert!(!o.hold(), "a writer is registered once per tick");
        push(2);
        assert!(
            o.ready().now_or_never().is_none(),
            "held: the update waits for the flush tick"
        );
        o.release();
        assert!(o.ready().now_or_never().is_some(), "the tick wakes it");
        assert!(!o.is_held());
        assert_eq!(o.drain().frames.len(), 1, "the held update goes out");

        assert!(o.hold());
        o.release();
        assert!(
            o.ready().now_or_never().is_none(),
            "a tick with nothing gathered wakes nobody"
        );
        push(3);
        assert!(
            o.ready().now_or_never().is_some(),
            "the next push goes at once"
        );
        assert_eq!(o.drain().frames.len(), 1);

        assert!(o.hold());
        o.request_close(CloseCode::GoingAway);
        assert!(o.ready().now_or_never().is_some(), "a close goes at once");
        assert!(o.urgent());
    }

    #[test]
    fn a_connection_that_fell_behind_gets_one_merged_update_at_the_last_position() {
        let o = outbox(1 << 20);
        let doc = DocId::parse("d").expect("id");
        let us = updates(20, 10);
        for (i, u) in us.iter().enumerate() {
            let p = pos(i as u64 + 1);
            o.push_update(
                &doc,
                update_frame(Proto::Native, &doc, u, p),
                u.clone(),
                p,
                true,
            );
        }
        o.push_own(&doc, Some(7), pos(21));
        assert!(o.pending_bytes() > 0);
        let d = o.drain();
        assert_eq!(d.frames.len(), 2, "one merged update, then the ack");
        match chorus_protocol::ServerFrame::decode(&d.frames[0]).expect("frame") {
            chorus_protocol::ServerFrame::Update {
                update, position, ..
            } => {
                assert_eq!(position, pos(20));
                let merged = yrs::merge_updates_v1(us.iter().map(|u| u.as_ref())).expect("merge");
                assert_eq!(update, merged);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            chorus_protocol::ServerFrame::decode(&d.frames[1]),
            Ok(chorus_protocol::ServerFrame::Ack { seq: Some(7), position, .. }) if position == pos(21)
        ));
    }

    #[test]
    fn over_budget_pending_updates_are_dropped_for_a_catch_up_from_the_last_sent_position() {
        let o = outbox(16 * 1024);
        let doc = DocId::parse("d").expect("id");
        let us = updates(40, 1024);
        let first = &us[0];
        o.push_update(
            &doc,
            update_frame(Proto::Native, &doc, first, pos(1)),
            first.clone(),
            pos(1),
            true,
        );
        let _ = o.drain(); // the socket took position 1
        for (i, u) in us.iter().enumerate().skip(1) {
            let p = pos(i as u64 + 1);
            o.push_update(
                &doc,
                update_frame(Proto::Native, &doc, u, p),
                u.clone(),
                p,
                true,
            );
            assert!(o.pending_bytes() <= 16 * 1024, "never above budget");
        }
        o.push_own(&doc, Some(9), pos(41));
        assert_eq!(o.stats.sheds.load(Ordering::Relaxed), 1);
        // Without a handle attached nobody can be asked for the catch-up; attach-less drains
        // still must not send anything stale.
        let d = o.drain();
        assert!(d.frames.is_empty(), "dropped updates are not sent");
        // The catch-up arrives: the owed ack follows it at the catch-up's position.
        o.push_synced(&doc, Bytes::from_static(b"synced"), pos(41));
        let d = o.drain();
        assert_eq!(d.frames.len(), 2);
        assert_eq!(d.frames[0], Bytes::from_static(b"synced"));
    }

    fn push_updates(o: &Outbox, doc: &DocId, us: &[Bytes], first_seq: u64) {
        for (i, u) in us.iter().enumerate() {
            let p = pos(first_seq + i as u64);
            o.push_update(
                doc,
                update_frame(Proto::Native, doc, u, p),
                u.clone(),
                p,
                true,
            );
        }
    }

    #[test]
    fn a_newer_sync_answer_replaces_the_waiting_one_and_every_update_before_it() {
        let o = outbox(1 << 20);
        let doc = DocId::parse("d").expect("id");
        push_updates(&o, &doc, &updates(3, 10), 1);
        o.push_own(&doc, Some(4), pos(4));
        o.push_synced(&doc, Bytes::from(vec![1u8; 1000]), pos(4));
        push_updates(&o, &doc, &updates(2, 10), 5);
        o.push_synced(&doc, Bytes::from(vec![2u8; 1000]), pos(6));
        // One answer and the ack owed for the connection's own entry, at the answer's position.
        assert_eq!(o.pending_bytes(), 1000 + ACK_COST);
        assert_eq!(o.stats.replaced_answers.load(Ordering::Relaxed), 1);
        let d = o.drain();
        assert_eq!(d.frames.len(), 2, "{:?}", d.frames.len());
        assert_eq!(d.frames[0], Bytes::from(vec![2u8; 1000]));
        assert!(matches!(
            chorus_protocol::ServerFrame::decode(&d.frames[1]),
            Ok(chorus_protocol::ServerFrame::Ack { seq: Some(4), position, .. }) if position == pos(6)
        ));
        assert_eq!(o.pending_bytes(), 0);
    }

    #[test]
    fn a_thousand_sync_requests_cost_one_answer() {
        let o = outbox(16 * 1024);
        let doc = DocId::parse("d").expect("id");
        let answer = Bytes::from(vec![7u8; 100 * 1024]);
        for i in 0..1000 {
            o.push_synced(&doc, answer.clone(), pos(i));
            assert!(
                o.pending_bytes() <= answer.len(),
                "one answer waits at most"
            );
        }
        assert!(
            o.over_budget(),
            "an answer larger than the budget stops reading"
        );
        let d = o.drain();
        assert_eq!(d.frames, vec![answer]);
        assert!(!o.over_budget());
    }

    #[test]
    fn the_reader_waits_for_room_until_a_drain_brings_the_outbox_under_budget() {
        use futures_util::FutureExt;
        let o = Arc::new(outbox(1024));
        let doc = DocId::parse("d").expect("id");
        o.push_synced(&doc, Bytes::from(vec![0u8; 4096]), pos(1));
        let room = o.clone();
        let mut waiting = Box::pin(async move { room.room().await });
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "over budget: no room"
        );
        let _ = o.drain();
        assert!(waiting.now_or_never().is_some(), "the drain made room");
    }

    #[test]
    fn over_budget_updates_go_but_a_waiting_answer_stays_and_the_catch_up_starts_after_it() {
        let o = outbox(8 * 1024);
        let doc = DocId::parse("d").expect("id");
        let (handle, _commands) = DocHandle::for_tests(&doc);
        o.attach(&doc, handle);
        let answer = Bytes::from(vec![3u8; 6 * 1024]);
        o.push_synced(&doc, answer.clone(), pos(10));
        push_updates(&o, &doc, &updates(10, 512), 11);
        assert_eq!(o.stats.sheds.load(Ordering::Relaxed), 1);
        let d = o.drain();
        assert_eq!(
            d.frames,
            vec![answer],
            "the answer is never dropped for the budget"
        );
        assert_eq!(d.resync.len(), 1);
        assert_eq!(
            d.resync[0].1,
            Some(pos(10)),
            "the catch-up follows what the socket got"
        );
    }

    #[test]
    fn error_frames_and_awareness_count_toward_the_budget() {
        let o = outbox(4 * 1024);
        let doc = DocId::parse("d").expect("id");
        let (handle, _commands) = DocHandle::for_tests(&doc);
        o.attach(&doc, handle);
        assert!(o.push_control(Bytes::from(vec![0u8; 100])));
        assert_eq!(o.pending_bytes(), 100);
        // Many clients' presence, each state large: past the budget it is dropped and a
        // snapshot of it is owed instead.
        for id in 0..40u64 {
            let mut aw = yrs::sync::Awareness::new(yrs::Doc::with_client_id(id + 1));
            aw.set_local_state_raw(format!("{{\"pad\":\"{}\"}}", "x".repeat(200)));
            let raw = aw.update().expect("update").encode_v1();
            o.push_awareness(
                &doc,
                awareness_frame(Proto::Native, &doc, &raw),
                Bytes::from(raw),
            );
            assert!(
                o.pending_bytes() <= 4 * 1024 + 1024,
                "{}",
                o.pending_bytes()
            );
        }
        let d = o.drain();
        assert_eq!(d.awareness.len(), 1, "an awareness snapshot is owed");
        assert_eq!(o.pending_bytes(), 0);
    }

    #[test]
    fn awareness_is_rate_capped_and_newest_state_wins() {
        let o = outbox(1 << 20);
        let doc = DocId::parse("d").expect("id");
        let mut aw = yrs::sync::Awareness::new(yrs::Doc::with_client_id(5));
        let mut push = |n: u32| {
            aw.set_local_state_raw(format!("{{\"n\":{n}}}"));
            let raw = aw.update().expect("update").encode_v1();
            o.push_awareness(
                &doc,
                awareness_frame(Proto::Native, &doc, &raw),
                Bytes::from(raw),
            );
        };
        push(1);
        assert_eq!(o.drain().frames.len(), 1);
        for n in 2..50 {
            push(n);
        }
        let held = o.drain();
        assert!(
            held.frames.is_empty(),
            "within the interval nothing more is sent"
        );
        assert!(held.wake_at.is_some());
        std::thread::sleep(Duration::from_millis(120));
        let d = o.drain();
        assert_eq!(d.frames.len(), 1, "one frame for everything that waited");
        let Ok(chorus_protocol::ServerFrame::Awareness { update, .. }) =
            chorus_protocol::ServerFrame::decode(&d.frames[0])
        else {
            panic!("awareness frame")
        };
        let u = AwarenessUpdate::decode_v1(&update).expect("decode");
        assert!(
            u.clients.values().all(|e| e.json.contains("49")),
            "newest state wins"
        );
    }

    /// A socket that takes at most `room` bytes (framing nothing: payloads count as is).
    #[derive(Default)]
    struct FakeSocket {
        room: Mutex<usize>,
        written: Mutex<Vec<u8>>,
    }

    impl FakeSocket {
        fn take(&self, bytes: &Bytes) -> Sent {
            let mut room = self.room.lock().expect("test lock");
            if *room == 0 {
                return Sent::Blocked;
            }
            let n = bytes.len().min(*room);
            *room -= n;
            self.written
                .lock()
                .expect("test lock")
                .extend_from_slice(&bytes[..n]);
            if n == bytes.len() {
                Sent::All
            } else {
                Sent::Partial(vec![bytes.slice(n..)])
            }
        }
    }

    impl DirectSocket for FakeSocket {
        fn try_send(&self, payload: &Bytes) -> Sent {
            self.take(payload)
        }
        fn try_send_raw(&self, raw: &Bytes) -> Sent {
            self.take(raw)
        }
    }

    fn direct(room: usize) -> (Outbox, Arc<FakeSocket>) {
        let o = outbox(1 << 20);
        let socket = Arc::new(FakeSocket {
            room: Mutex::new(room),
            ..Default::default()
        });
        o.attach_socket(socket.clone());
        (o, socket)
    }

    fn push_n(o: &Outbox, doc: &DocId, us: &[Bytes], from: u64) -> Vec<bool> {
        us.iter()
            .enumerate()
            .map(|(i, u)| {
                let p = pos(from + i as u64);
                o.push_update(
                    doc,
                    update_frame(Proto::Native, doc, u, p),
                    u.clone(),
                    p,
                    true,
                )
            })
            .collect()
    }

    #[test]
    fn a_socket_that_keeps_up_gets_updates_written_at_once_and_nothing_queued() {
        let (o, socket) = direct(usize::MAX);
        let doc = DocId::parse("d").expect("id");
        let us = updates(3, 10);
        assert_eq!(push_n(&o, &doc, &us, 1), [true, true, true]);
        assert_eq!(o.pending_bytes(), 0);
        let d = o.drain();
        assert!(d.frames.is_empty() && d.raw.is_empty());
        let expected: Vec<u8> = us
            .iter()
            .enumerate()
            .flat_map(|(i, u)| update_frame(Proto::Native, &doc, u, pos(i as u64 + 1)).to_vec())
            .collect();
        assert_eq!(*socket.written.lock().expect("test lock"), expected);
    }

    #[test]
    fn once_something_queues_for_a_document_everything_after_it_queues_until_written() {
        let (o, socket) = direct(0);
        let doc = DocId::parse("d").expect("id");
        let us = updates(3, 10);
        assert_eq!(push_n(&o, &doc, &us[..1], 1), [false], "blocked: queued");
        *socket.room.lock().expect("test lock") = usize::MAX;
        assert_eq!(
            push_n(&o, &doc, &us[1..2], 2),
            [false],
            "the socket has room again, but the queue comes first"
        );
        let d = o.drain();
        assert_eq!(d.frames.len(), 2);
        assert_eq!(
            push_n(&o, &doc, &us[2..], 3),
            [false],
            "the writer is still writing what it took"
        );
        o.finish_write();
        let d = o.drain();
        assert_eq!(d.frames.len(), 1, "position 3 waited behind the write");
        o.finish_write();
        assert_eq!(push_n(&o, &doc, &us[..1], 4), [true]);
    }

    #[test]
    fn a_short_direct_write_leaves_the_rest_of_the_shared_frame_in_front_of_everything() {
        let doc = DocId::parse("d").expect("id");
        let us = updates(2, 100);
        let first = update_frame(Proto::Native, &doc, &us[0], pos(1));
        let (o, socket) = direct(first.len() / 2);
        assert_eq!(push_n(&o, &doc, &us[..1], 1), [true], "written, partly");
        assert_eq!(
            push_n(&o, &doc, &us[1..], 2),
            [false],
            "queued behind the rest"
        );
        assert!(o.pending_bytes() >= first.len() - first.len() / 2);
        let d = o.drain();
        assert_eq!(d.raw.len(), 1);
        assert_eq!(
            d.raw[0],
            first.slice(first.len() / 2..),
            "the rest, not a copy"
        );
        assert_eq!(d.frames.len(), 1);
        assert_eq!(
            socket.written.lock().expect("test lock").len(),
            first.len() / 2
        );
    }

    #[test]
    fn while_the_writer_writes_pings_queue_and_are_taken_from_the_front_only() {
        let (o, _socket) = direct(usize::MAX);
        // The writer is writing what it drained (a long answer, say): raw frames queue.
        o.lock().writing = true;
        let ping = Bytes::from_static(b"ping");
        let other = Bytes::from_static(b"close reply");
        o.push_raw(ping.clone());
        o.push_raw(other.clone());
        o.push_raw(ping.clone());
        let before = o.pending_bytes();
        let taken = o.take_raw_while(|r| r == &ping);
        assert_eq!(taken, std::slice::from_ref(&ping), "only the leading ping");
        assert_eq!(o.pending_bytes(), before - ping.len(), "and its bytes");
        assert_eq!(o.take_raw(), [other, ping], "the rest keeps its order");
    }
}
