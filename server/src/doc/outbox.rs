//! Fan-out end of a document (data-flow step 6): what waits for one connection, merged.
//!
//! Documents push already-encoded frames (built once per entry, shared by every recipient)
//! together with the raw update. While a connection keeps up, the shared frame goes out as is.
//! When it falls behind, what waits for a document is merged at drain time in one batch — all
//! pending updates in a single `merge_updates_v1` call, not pairwise on arrival — and
//! awareness keeps only the newest state per client. Bytes held are accounted; past the budget
//! the pending updates are dropped and the document is asked to bring the connection up to
//! date from the last position it was actually sent, once it drains. Nothing is lost: the
//! document has every update, and positions only ever move forward on the wire.

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

/// Which wire protocol a connection speaks; decides how merged items are re-encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Native,
    /// y-websocket (`/y/{doc}`).
    Yjs,
}

enum Item {
    /// Sent as is: `synced`, sync step 1/2, awareness snapshots.
    Frame(Bytes, Option<Position>),
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

impl Item {
    fn cost(&self) -> usize {
        match self {
            Item::Frame(f, _) => f.len(),
            Item::Update { frame, update, .. } => frame.len() + update.len(),
            Item::Own { .. } => 32,
        }
    }
}

#[derive(Default)]
struct DocQueue {
    items: VecDeque<Item>,
    awareness: Vec<(Bytes, Bytes)>,
    /// Awareness is sent to this connection no sooner than this (the per-connection cap).
    next_awareness: Option<Instant>,
    /// Position of the last thing handed to the socket for this document.
    sent: Option<Position>,
    /// Pending updates were dropped; waiting for the document's catch-up `synced`.
    resync: Resync,
    /// Acks owed for own entries that arrived while resyncing.
    owed_acks: Vec<Option<u64>>,
    handle: Option<DocHandle>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Resync {
    #[default]
    No,
    /// Dropped; the writer must ask the document for a catch-up.
    Needed,
    /// Asked; items are ignored until the catch-up arrives.
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
}

/// What a drain produced, in send order.
pub struct Drained {
    pub frames: Vec<Bytes>,
    /// Documents to ask for a catch-up, from the given position (None: whole state).
    pub resync: Vec<(DocHandle, Option<Position>)>,
    pub close: Option<CloseCode>,
    /// Awareness held back by the rate cap: drain again at this time.
    pub wake_at: Option<Instant>,
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
    /// Connections right now in their last grace period before a 4001 close.
    pub stalled: AtomicU64,
    /// Connections closed (or dropped) for not reading.
    pub slow_closes: AtomicU64,
    /// Socket writes (flushes) that carried drained frames.
    pub writes: AtomicU64,
    /// Frames those writes carried (frames / writes > 1: several went out in one write).
    pub frames_written: AtomicU64,
}

pub struct Outbox {
    pub conn: ConnId,
    pub proto: Proto,
    limits: OutboxLimits,
    stats: Arc<OutboxStats>,
    state: Mutex<State>,
    notify: Notify,
}

/// Pending updates for one document from which a drain merges them into one (a connection
/// that fell behind); fewer go out as the shared frames.
pub const MERGE_FROM: usize = 8;

/// Most error frames queued for one connection; a client producing more than this before
/// reading any is misbehaving and gets closed.
const MAX_CONTROL: usize = 64;

impl Outbox {
    pub fn new(conn: ConnId, proto: Proto, limits: OutboxLimits, stats: Arc<OutboxStats>) -> Self {
        Outbox {
            conn,
            proto,
            limits,
            stats,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until there is something to drain.
    pub async fn ready(&self) {
        self.notify.notified().await
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
            let freed: usize = q.items.iter().map(Item::cost).sum::<usize>()
                + q.awareness
                    .iter()
                    .map(|(f, u)| f.len() + u.len())
                    .sum::<usize>();
            s.bytes = s.bytes.saturating_sub(freed);
        }
        s.ready.retain(|d| d != doc);
    }

    /// Marks the outbox closed: later pushes are dropped (the connection is gone).
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.docs.clear();
        s.ready.clear();
        s.control.clear();
        s.bytes = 0;
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
        if s.control.len() >= MAX_CONTROL {
            return false;
        }
        s.control.push_back(frame);
        drop(s);
        self.notify.notify_one();
        true
    }

    fn push(&self, doc: &DocId, item: Item) {
        let mut s = self.lock();
        if s.closed {
            return;
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
            }
            return;
        }
        if q.items.is_empty() && q.awareness.is_empty() {
            ready.push_back(doc.clone());
        }
        q.items.push_back(item);
        *bytes += cost;
        if *bytes > self.limits.budget {
            self.shed(&mut s);
        }
        let tell = !std::mem::replace(&mut s.told, true);
        drop(s);
        if tell {
            self.notify.notify_one();
        }
    }

    /// Over budget: drop every pending update and owe each document a catch-up instead.
    fn shed(&self, s: &mut State) {
        let mut freed = 0;
        for (doc, q) in s.docs.iter_mut() {
            let had_updates = q
                .items
                .iter()
                .any(|i| matches!(i, Item::Update { .. } | Item::Own { .. }));
            if !had_updates {
                continue;
            }
            // The catch-up starts from what the socket really got; a queued `synced` that is
            // dropped here is simply re-done by the catch-up.
            for item in q.items.drain(..) {
                freed += item.cost();
                if let Item::Own { seq, .. } = item {
                    q.owed_acks.push(seq);
                }
            }
            q.resync = Resync::Needed;
            if !s.ready.contains(doc) {
                s.ready.push_back(doc.clone());
            }
        }
        s.bytes = s.bytes.saturating_sub(freed);
        self.stats.sheds.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            conn = self.conn,
            freed,
            "outbox over budget: pending updates dropped, catch-up owed"
        );
    }

    /// A catch-up or initial sync: the client is at `position` once it has `frame`.
    pub fn push_synced(&self, doc: &DocId, frame: Bytes, position: Position) {
        let acks = {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            let q = s.docs.entry(doc.clone()).or_default();
            q.resync = Resync::No;
            std::mem::take(&mut q.owed_acks)
        };
        self.push(doc, Item::Frame(frame, Some(position)));
        for seq in acks {
            self.push(doc, Item::Own { seq, position });
        }
    }

    pub fn push_frame(&self, doc: &DocId, frame: Bytes) {
        self.push(doc, Item::Frame(frame, None));
    }

    pub fn push_update(&self, doc: &DocId, frame: Bytes, update: Bytes, position: Position) {
        self.push(
            doc,
            Item::Update {
                frame,
                update,
                position,
            },
        );
    }

    pub fn push_own(&self, doc: &DocId, seq: Option<u64>, position: Position) {
        self.push(doc, Item::Own { seq, position });
    }

    /// Awareness: `frame` is the encoded message, `update` the raw awareness update used when
    /// several are waiting and get merged (newest state per client wins).
    pub fn push_awareness(&self, doc: &DocId, frame: Bytes, update: Bytes) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        let cost = frame.len() + update.len();
        let State {
            docs, ready, bytes, ..
        } = &mut *s;
        let q = docs.entry(doc.clone()).or_default();
        if q.items.is_empty() && q.awareness.is_empty() {
            ready.push_back(doc.clone());
        }
        q.awareness.push((frame, update));
        *bytes += cost;
        if q.awareness.len() > 64 {
            // Keep awareness bounded by client count, not by message count.
            let merged = merge_awareness(q.awareness.iter().map(|(_, u)| u));
            let freed: usize = q.awareness.iter().map(|(f, u)| f.len() + u.len()).sum();
            let frame = awareness_frame(self.proto, doc, &merged);
            *bytes = bytes.saturating_sub(freed) + frame.len() + merged.len();
            q.awareness = vec![(frame, Bytes::from(merged))];
        }
        let tell = !std::mem::replace(&mut s.told, true);
        drop(s);
        if tell {
            self.notify.notify_one();
        }
    }

    /// Takes everything waiting, merging per document. Merging runs here, in the connection's
    /// writer task, outside the lock: a slow connection pays for its own merges.
    pub fn drain(&self) -> Drained {
        let mut taken = Vec::new();
        let mut resync = Vec::new();
        let mut wake_at: Option<Instant> = None;
        let now = Instant::now();
        let (control, close) = {
            let mut s = self.lock();
            s.told = false;
            let ready = std::mem::take(&mut s.ready);
            let mut freed = 0;
            let mut deferred = Vec::new();
            for doc in ready {
                let Some(q) = s.docs.get_mut(&doc) else {
                    continue;
                };
                if q.resync == Resync::Needed {
                    q.resync = Resync::Requested;
                    if let Some(h) = &q.handle {
                        resync.push((h.clone(), q.sent));
                    }
                }
                let items = std::mem::take(&mut q.items);
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
                    let a = std::mem::take(&mut q.awareness);
                    freed += a.iter().map(|(f, u)| f.len() + u.len()).sum::<usize>();
                    a
                };
                taken.push((doc, items, awareness));
            }
            s.ready.extend(deferred);
            s.bytes = s.bytes.saturating_sub(freed);
            (std::mem::take(&mut s.control), s.close)
        };
        let mut frames: Vec<Bytes> = control.into_iter().collect();
        let mut sent_updates = Vec::new();
        for (doc, items, awareness) in taken {
            let last = self.encode_items(&doc, items, &mut frames);
            if let Some(p) = last {
                sent_updates.push((doc.clone(), p));
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
        if !sent_updates.is_empty() {
            let mut s = self.lock();
            for (doc, p) in sent_updates {
                if let Some(q) = s.docs.get_mut(&doc) {
                    q.sent = Some(p);
                }
            }
        }
        Drained {
            frames,
            resync,
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
                Item::Frame(frame, position) => {
                    self.flush_run(doc, &mut run, out, &mut last);
                    out.push(frame);
                    if position.is_some() {
                        last = position;
                    }
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
                Item::Frame(..) => {}
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
        Proto::Yjs => Bytes::from(crate::connection::yjs::sync_update_message(update)),
    }
}

pub fn awareness_frame(proto: Proto, doc: &DocId, update: &[u8]) -> Bytes {
    match proto {
        Proto::Native => Bytes::from(encode::awareness(doc.as_str(), update)),
        Proto::Yjs => Bytes::from(crate::connection::yjs::awareness_message(update)),
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
        o.push_update(&doc, frame.clone(), u, pos(1));
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
            o.push_update(&doc, update_frame(Proto::Native, &doc, u, p), u.clone(), p);
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
        );
        let _ = o.drain(); // the socket took position 1
        for (i, u) in us.iter().enumerate().skip(1) {
            let p = pos(i as u64 + 1);
            o.push_update(&doc, update_frame(Proto::Native, &doc, u, p), u.clone(), p);
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
}
