//! Fan-out end of a document (data-flow step 6): what waits for one connection, merged.
//!
//! Documents push frames already encoded for the connection's [`Wire`] (built once per entry
//! and wire, shared by every recipient of that wire) together with the neutral pieces they came
//! from: the raw update and its position, an own entry's sequence number. While a connection
//! keeps up, the shared frame goes out as is. When it falls behind, what waits for a document
//! is merged at drain time in one batch — all pending updates in a single `merge_updates_v1`
//! call, not pairwise on arrival — re-encoded by the outbox's wire, and awareness keeps only
//! the newest state per client. Nothing is lost: the document has every update, and positions
//! only ever move forward on the wire. The outbox knows no protocol: which frames a wire has
//! (acks, presence) and what they look like is the wire's business.
//!
//! Every kind of frame is bounded, because a client can make the node produce any of them:
//! - a sync answer (a catch-up, the whole document) waits at most once per
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
//!
//! Layout: this file holds the outbox's face to connections (create, close, budget, wake the
//! writer, control frames); [`queue`] what waits per document and the budget's shedding;
//! [`direct`] the write-first door; [`drain`] what the writer takes and how a backlog merges.

mod direct;
mod drain;
mod queue;
#[cfg(test)]
mod tests;

use super::wire::{Wire, WireId};
use super::{ConnId, DocHandle};
use bytes::Bytes;
use chorus_protocol::{CloseCode, DocId, Position};
use direct::Framing;
use queue::State;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

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
    /// How this connection's frames are encoded (merged runs, acks, awareness).
    pub wire: &'static dyn Wire,
    /// `wire.id()`, kept so the fan-out indexes its per-wire frames without a call.
    wire_id: WireId,
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
const MERGE_FROM: usize = 8;

/// Most error frames queued for one connection; a client producing more than this before
/// reading any is misbehaving and gets closed.
const MAX_CONTROL: usize = 64;

/// Raw awareness updates kept for one document before they are merged into one (newest state
/// per client): awareness stays bounded by the number of clients, not of messages.
const AWARENESS_MERGE_FROM: usize = 16;

impl Outbox {
    pub fn new(
        conn: ConnId,
        wire: &'static dyn Wire,
        limits: OutboxLimits,
        stats: Arc<OutboxStats>,
    ) -> Self {
        Outbox {
            conn,
            wire,
            wire_id: wire.id(),
            limits,
            stats,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            room: Notify::new(),
        }
    }

    pub fn wire_id(&self) -> WireId {
        self.wire_id
    }

    /// From now on pushes may write to `socket` directly.
    pub fn attach_socket(&self, socket: Arc<dyn DirectSocket>) {
        self.lock().socket = Some(socket);
    }

    /// Queues framed bytes (a ping, tungstenite's pong) in front of every queued frame, or
    /// writes them at once when nothing is being written.
    pub fn push_raw(&self, raw: Bytes) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        match self.try_direct(&mut s, &raw, Framing::Framed) {
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
        match self.try_direct(&mut s, &frame, Framing::Message) {
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
}
