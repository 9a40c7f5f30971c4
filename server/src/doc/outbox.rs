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
use std::sync::Mutex;
use tokio::sync::Notify;
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
    docs: HashMap<DocId, DocQueue>,
    /// Documents with something pending, in the order they first had it.
    ready: VecDeque<DocId>,
    bytes: usize,
    control: VecDeque<Bytes>,
    close: Option<CloseCode>,
    closed: bool,
}

/// What a drain produced, in send order.
pub struct Drained {
    pub frames: Vec<Bytes>,
    /// Documents to ask for a catch-up, from the given position (None: whole state).
    pub resync: Vec<(DocHandle, Option<Position>)>,
    pub close: Option<CloseCode>,
}

pub struct Outbox {
    pub conn: ConnId,
    pub proto: Proto,
    budget: usize,
    state: Mutex<State>,
    notify: Notify,
}

/// Most error frames queued for one connection; a client producing more than this before
/// reading any is misbehaving and gets closed.
const MAX_CONTROL: usize = 64;

impl Outbox {
    pub fn new(conn: ConnId, proto: Proto, budget: usize) -> Self {
        Outbox {
            conn,
            proto,
            budget,
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
        if *bytes > self.budget {
            self.shed(&mut s);
        }
        drop(s);
        self.notify.notify_one();
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
        drop(s);
        self.notify.notify_one();
    }

    /// Takes everything waiting, merging per document. Merging runs here, in the connection's
    /// writer task, outside the lock: a slow connection pays for its own merges.
    pub fn drain(&self) -> Drained {
        let mut taken = Vec::new();
        let mut resync = Vec::new();
        let (control, close) = {
            let mut s = self.lock();
            let ready = std::mem::take(&mut s.ready);
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
                let awareness = std::mem::take(&mut q.awareness);
                taken.push((doc, items, awareness));
            }
            s.bytes = 0;
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
            1 => out.extend(updates.drain(..).map(|(f, _, _)| f)),
            _ => {
                let position = updates.last().map(|u| u.2);
                let merged = yrs::merge_updates_v1(updates.iter().map(|(_, u, _)| u.as_ref()));
                match (merged, position) {
                    (Ok(merged), Some(position)) => {
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
