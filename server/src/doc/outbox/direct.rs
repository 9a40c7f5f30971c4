//! The outbox's write-first door (data-flow step 6): a push writes straight to an idle
//! socket from the pushing task, and queues only what the socket does not take.

use super::queue::{Item, State};
use super::{Outbox, Sent};
use bytes::Bytes;
use chorus_protocol::DocId;
use std::sync::atomic::Ordering;

/// What a direct write hands the socket.
#[derive(Clone, Copy)]
pub(super) enum Framing {
    /// A protocol message: the socket puts its frame header in front.
    Message,
    /// Bytes the socket framed already (the rest of a short write, a ping, a pong).
    Framed,
}

impl State {
    /// Whether nothing is queued or being written on the socket as a whole, so a frame may be
    /// written directly (the document's own queue is checked by the caller).
    pub(super) fn socket_idle(&self) -> bool {
        self.socket.is_some()
            && !self.writing
            && !self.held
            && !self.closed
            && self.close.is_none()
            && self.raw.is_empty()
            && self.control.is_empty()
    }
}

impl Outbox {
    /// Writes `payload` now if nothing is queued before it. `None`: not written, queue it.
    /// `Some(true)`: all of it went; `Some(false)`: part went, and the rest now waits in
    /// `raw` for the writer (who must be told).
    pub(super) fn try_direct(
        &self,
        s: &mut State,
        payload: &Bytes,
        framing: Framing,
    ) -> Option<bool> {
        if !s.socket_idle() {
            return None;
        }
        let socket = s.socket.as_deref()?;
        let sent = match framing {
            Framing::Message => socket.try_send(payload),
            Framing::Framed => socket.try_send_raw(payload),
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

    /// Writes one item straight to the socket (see [`Outbox::try_direct`]) and records the
    /// position it brings the client to. `None`: the socket took none of it.
    pub(super) fn push_direct(&self, s: &mut State, doc: &DocId, item: &Item) -> Option<bool> {
        let (payload, position) = match item {
            Item::Update {
                frame, position, ..
            } => (Some(frame.clone()), Some(*position)),
            // A wire without acks: the own entry only moves the position.
            Item::Own { seq, position } => (self.wire.ack(doc, *seq, *position), Some(*position)),
            Item::Frame(f) => (Some(f.clone()), None),
            // An answer a wire has nothing to say for still moves the position.
            Item::Answer(parts, p) => match &parts[..] {
                [] => (None, Some(*p)),
                [f] => ((!f.is_empty()).then(|| f.clone()), Some(*p)),
                // Pieces of a very large answer: the writer sends them.
                _ => return None,
            },
        };
        let done = match payload {
            Some(p) => self.try_direct(s, &p, Framing::Message)?,
            None => true,
        };
        if let Some(p) = position {
            s.docs.entry(doc.clone()).or_default().sent = Some(p);
        }
        Some(done)
    }

    /// Writes what waits at the front of `doc`'s queue directly while the socket takes it
    /// whole and nothing else is queued before it.
    pub(super) fn send_front(&self, s: &mut State, doc: &DocId) -> bool {
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
}
