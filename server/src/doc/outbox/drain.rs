//! What a connection's writer takes from its outbox (data-flow step 6): everything waiting,
//! with a backlog merged into one update per document and re-encoded by the outbox's wire.

use super::queue::{Item, Resync, State};
use super::{Drained, MERGE_FROM, Outbox};
use crate::doc::DocHandle;
use bytes::Bytes;
use chorus_protocol::{DocId, Position};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

/// One document's share of a drain, taken under the lock and encoded outside it.
struct Taken {
    doc: DocId,
    items: VecDeque<Item>,
    awareness: Vec<(Bytes, Bytes)>,
}

/// Everything a drain took under the lock.
#[derive(Default)]
struct Took {
    raw: Vec<Bytes>,
    control: VecDeque<Bytes>,
    docs: Vec<Taken>,
    resync: Vec<(DocHandle, Option<Position>)>,
    awareness_owed: Vec<DocHandle>,
    wake_at: Option<Instant>,
    was_over: bool,
}

impl Outbox {
    /// Takes everything waiting, merging per document. Merging runs here, in the connection's
    /// writer task, outside the lock: a slow connection pays for its own merges.
    pub fn drain(&self) -> Drained {
        let (took, close) = {
            let mut s = self.lock();
            let took = self.take(&mut s);
            (took, s.close)
        };
        if took.was_over {
            self.room.notify_waiters();
        }
        let mut frames: Vec<Bytes> = took.control.into_iter().collect();
        let mut sent = Vec::new();
        for Taken {
            doc,
            items,
            awareness,
        } in took.docs
        {
            if let Some(p) = self.encode_items(&doc, items, &mut frames) {
                sent.push((doc.clone(), p));
            }
            match awareness.len() {
                0 => {}
                1 => frames.extend(awareness.into_iter().map(|(f, _)| f)),
                _ => {
                    let merged = merge_awareness(awareness.iter().map(|(_, u)| u));
                    frames.extend(self.wire.awareness(&doc, &merged));
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
            raw: took.raw,
            frames,
            resync: took.resync,
            awareness: took.awareness_owed,
            close,
            wake_at: took.wake_at,
        }
    }

    /// Under the lock: takes the raw bytes, control frames and every ready document's items
    /// and due awareness, and notes the catch-ups and awareness snapshots owed.
    fn take(&self, s: &mut State) -> Took {
        let now = Instant::now();
        s.told = false;
        // Until `finish_write`: what is taken now must reach the socket before any direct
        // write.
        s.writing = s.socket.is_some();
        let mut took = Took {
            raw: std::mem::take(&mut s.raw),
            was_over: s.bytes > self.limits.budget,
            ..Took::default()
        };
        let mut freed = took.raw.iter().map(Bytes::len).sum::<usize>();
        let mut deferred = Vec::new();
        for doc in std::mem::take(&mut s.ready) {
            let Some(q) = s.docs.get_mut(&doc) else {
                continue;
            };
            let items = std::mem::take(&mut q.items);
            if q.resync == Resync::Needed {
                q.resync = Resync::Requested;
                // From what the socket really gets: an answer kept through the shed goes out
                // in this very drain.
                let from = items
                    .iter()
                    .rev()
                    .find_map(|i| match i {
                        Item::Answer(_, p) => Some(*p),
                        _ => None,
                    })
                    .or(q.sent);
                took.resync.extend(q.handle.clone().map(|h| (h, from)));
            }
            if std::mem::take(&mut q.awareness_owed) {
                took.awareness_owed.extend(q.handle.clone());
            }
            freed += items.iter().map(Item::cost).sum::<usize>();
            let awareness = match q.next_awareness {
                _ if q.awareness.is_empty() => Vec::new(),
                // Over the awareness rate: hold it (it keeps merging, newest state wins).
                Some(t) if t > now => {
                    took.wake_at = Some(took.wake_at.map_or(t, |w| w.min(t)));
                    deferred.push(doc.clone());
                    Vec::new()
                }
                _ => {
                    q.next_awareness = Some(now + self.limits.awareness_interval);
                    freed += std::mem::take(&mut q.awareness_bytes);
                    std::mem::take(&mut q.awareness)
                }
            };
            took.docs.push(Taken {
                doc,
                items,
                awareness,
            });
        }
        s.ready.extend(deferred);
        took.control = std::mem::take(&mut s.control);
        freed += took.control.iter().map(Bytes::len).sum::<usize>();
        s.bytes = s.bytes.saturating_sub(freed);
        took
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
                Item::Answer(parts, position) => {
                    self.flush_run(doc, &mut run, out, &mut last);
                    out.extend(parts.iter().filter(|f| !f.is_empty()).cloned());
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
                        out.push(self.wire.update(doc, &merged, position))
                    }
                    // Entries in the log were validated, so this does not happen; if it did,
                    // sending them one by one is still correct.
                    _ => out.extend(updates.drain(..).map(|(f, _, _)| f)),
                }
            }
        }
        if let Some(position) = run_last {
            out.extend(
                acks.into_iter()
                    .filter_map(|seq| self.wire.ack(doc, seq, position)),
            );
            *last = Some(position);
        }
    }
}

/// Merges raw awareness updates: per client the highest clock wins; on a tie a removal wins.
pub(super) fn merge_awareness<'a>(updates: impl Iterator<Item = &'a Bytes>) -> Vec<u8> {
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
