//! What waits for one connection, per document (data-flow step 6): the queued items, the
//! byte budget, and what is dropped (and owed instead) when the budget is exceeded.

use super::direct::Framing;
use super::drain::merge_awareness;
use super::{AWARENESS_MERGE_FROM, DirectSocket, Outbox};
use crate::doc::DocHandle;
use crate::doc::wire::Parts;
use bytes::Bytes;
use chorus_protocol::{CloseCode, DocId, Position};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

pub(super) enum Item {
    /// Sent as is and carries no document content, so it moves no position (a wire's join
    /// offer: see [`crate::doc::wire::Join::Offer`]).
    Frame(Bytes),
    /// Brings the client to `position` with content: a catch-up or the whole document. At
    /// most one per document.
    Answer(Parts, Position),
    /// A log entry from someone else.
    Update {
        frame: Bytes,
        update: Bytes,
        position: Position,
    },
    /// The connection's own entry: becomes the wire's ack, or nothing on a wire without acks.
    Own {
        seq: Option<u64>,
        position: Position,
    },
}

/// What an owed ack costs the budget (the frame it becomes is about this big).
pub(super) const ACK_COST: usize = 32;

impl Item {
    pub(super) fn cost(&self) -> usize {
        match self {
            Item::Frame(f) => f.len(),
            Item::Answer(parts, _) => parts.iter().map(Bytes::len).sum(),
            Item::Update { frame, update, .. } => frame.len() + update.len(),
            Item::Own { .. } => ACK_COST,
        }
    }

    pub(super) fn is_update(&self) -> bool {
        matches!(self, Item::Update { .. } | Item::Own { .. })
    }
}

#[derive(Default)]
pub(super) struct DocQueue {
    pub(super) items: VecDeque<Item>,
    pub(super) awareness: Vec<(Bytes, Bytes)>,
    /// Bytes of `awareness`.
    pub(super) awareness_bytes: usize,
    /// Pending awareness was dropped for the budget: the document owes a snapshot of it.
    pub(super) awareness_owed: bool,
    /// Awareness is sent to this connection no sooner than this (the per-connection cap).
    pub(super) next_awareness: Option<Instant>,
    /// Position of the last thing with content handed to the socket for this document.
    pub(super) sent: Option<Position>,
    /// Pending updates were dropped; waiting for the document's catch-up.
    pub(super) resync: Resync,
    /// Acks owed for own entries dropped or arrived while resyncing.
    pub(super) owed_acks: Vec<Option<u64>>,
    pub(super) handle: Option<DocHandle>,
}

impl DocQueue {
    pub(super) fn is_idle(&self) -> bool {
        self.items.is_empty() && self.awareness.is_empty()
    }

    /// Bytes this queue holds toward the budget.
    pub(super) fn cost(&self) -> usize {
        self.items.iter().map(Item::cost).sum::<usize>()
            + self.awareness_bytes
            + self.owed_acks.len() * ACK_COST
    }
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resync {
    #[default]
    No,
    /// Dropped; the writer must ask the document for a catch-up.
    Needed,
    /// Asked; updates are ignored until the catch-up arrives.
    Requested,
}

#[derive(Default)]
pub(super) struct State {
    /// Boxed: a map allocates room for several entries at once, and most connections hold
    /// one document (this is per idle connection memory).
    pub(super) docs: HashMap<DocId, Box<DocQueue>>,
    /// Documents with something pending, in the order they first had it.
    pub(super) ready: VecDeque<DocId>,
    pub(super) bytes: usize,
    pub(super) control: VecDeque<Bytes>,
    pub(super) close: Option<CloseCode>,
    pub(super) closed: bool,
    /// Something was pushed since the writer last drained and the writer was told. Later
    /// pushes don't notify again: one wake per drain, however many updates arrive meanwhile.
    pub(super) told: bool,
    /// Waiting for the node's flush tick (see `hold`).
    pub(super) held: bool,
    /// Framed bytes to write before anything else: the rest of a short direct write, the
    /// replies tungstenite owes (pongs), pings.
    pub(super) raw: Vec<Bytes>,
    /// The writer took frames and is writing them: no direct write may go in between.
    pub(super) writing: bool,
    /// Set once the connection's socket is up (never for SSE and long-polls, nor with
    /// `--flush-interval`, which batches on purpose); dropped at close.
    pub(super) socket: Option<Arc<dyn DirectSocket>>,
}

impl State {
    pub(super) fn mark_ready(&mut self, doc: &DocId) {
        if !self.ready.contains(doc) {
            self.ready.push_back(doc.clone());
        }
    }
}

impl Outbox {
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
    pub fn push_synced(&self, doc: &DocId, frame: Parts, position: Position) {
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
        let answer = Item::Answer(frame, position);
        let added = answer.cost() + acks.len() * ACK_COST;
        kept.push_back(answer);
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
            && let Some(done) = self.try_direct(&mut s, &frame, Framing::Message)
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
            let frame = self.wire.awareness(doc, &merged).unwrap_or_default();
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
}
