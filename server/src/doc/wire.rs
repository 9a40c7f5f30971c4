//! How a document's frames look on one wire protocol (data-flow step 6): the seam between the
//! protocol-neutral documents and outboxes of `doc/` and the protocols of `connection/`.
//!
//! A document never branches on a protocol. It hands each subscriber's [`Wire`] the neutral
//! pieces (an update and its position, a sync answer, an awareness update, an ack) and gets the
//! frame that subscriber's socket or stream sends. The protocols implement the trait in
//! `connection/` (native MessagePack, y-websocket, Server-Sent Events), so nothing here points
//! up at them.
//!
//! Why statics with a dense [`WireId`], not a `HashMap` or a pointer compare: per log entry
//! the owner encodes once per wire in use and gives the same `Bytes` to every recipient of that
//! wire, so it needs a per-wire slot it can index without hashing on the fan-out path (a small
//! array of [`MAX_WIRES`]), and so does the whole-document answer cache. Zero-sized statics may
//! share an address, so their pointers cannot tell wires apart; an index can.

use bytes::Bytes;
use chorus_protocol::{DocId, ErrorCode, Position};
use std::sync::Arc;

/// Wires a node can speak at once; [`WireId`]s are below this.
pub const MAX_WIRES: usize = 4;

/// A wire's dense index (per-wire caches are arrays of [`MAX_WIRES`]). Each wire has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireId(u8);

impl WireId {
    /// Meant for `const` items: an index past [`MAX_WIRES`] then fails the build, not a run.
    pub const fn new(index: u8) -> WireId {
        assert!((index as usize) < MAX_WIRES, "WireId past MAX_WIRES");
        WireId(index)
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// The frames of one sync answer, in order (see [`Wire::synced`]); shared like a frame, as a
/// whole-document answer goes to every joiner.
pub type Parts = Arc<[Bytes]>;

/// An answer of one frame.
pub fn one(frame: Bytes) -> Parts {
    Arc::from([frame])
}

/// What a sync answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Exactly the log entries after the client's position, merged.
    Replay,
    /// A state: the diff against the client's state vector, or the whole document.
    State,
}

/// How a client that brings neither a position nor a state vector joins a document.
#[derive(Debug, Clone, Copy)]
pub enum Join {
    /// It is answered with the whole document at once.
    Answer,
    /// The document offers its state vector with this frame (it carries no content, so it
    /// moves no position), and answers only the client's own request for what it lacks
    /// ([`super::DocHandle::diff`]). y-websocket joins this way: its client sends its own
    /// step 1 on connect, and answering the join too would send a large document twice.
    Offer(fn(&DocId, &[u8]) -> Bytes),
}

/// One wire protocol's frames. Calls come from a document's owner task and from connection
/// writers merging a backlog, so each must be cheap and must not block.
pub trait Wire: Send + Sync + 'static {
    fn id(&self) -> WireId;

    /// The protocol's name for operators (the inspector counts subscribers by it).
    fn name(&self) -> &'static str;

    /// A log entry, or a run of them merged, that brings the client to `position`.
    fn update(&self, doc: &DocId, update: &[u8], position: Position) -> Bytes;

    /// An answer that brings the client to `position`: usually one frame, or several that
    /// each apply on their own, sent in order (a wire whose clients time out between messages
    /// cuts a very large answer into pieces). An empty frame is skipped by the writer but the
    /// answer still moves the position (a replay with nothing in it, on a wire that says
    /// nothing for that).
    fn synced(&self, doc: &DocId, update: &[u8], position: Position, answer: Answer) -> Parts;

    /// Other clients' presence (a y-protocols awareness update); `None`: this wire carries
    /// no presence, and the document pushes none to it.
    fn awareness(&self, doc: &DocId, raw: &[u8]) -> Option<Bytes>;

    /// The client's own entry reached the log at `position`; `None`: this wire has no acks
    /// (the entry only moves the client's position).
    fn ack(&self, doc: &DocId, seq: Option<u64>, position: Position) -> Option<Bytes>;

    /// A document-level refusal; `None`: this wire has no way to say it, and says nothing.
    fn error(&self, doc: &DocId, code: ErrorCode, message: &str) -> Option<Bytes>;

    fn join(&self) -> Join;
}

#[cfg(test)]
pub(crate) mod testing {
    //! A wire for `doc/` tests: one header line (`update <position>`, `ack <seq> <position>`,
    //! `synced <replay|state> <position>`, `awareness`, `error`), a newline, then the payload,
    //! so assertions read what a frame says without a protocol crate.

    use super::*;

    pub struct TestWire;

    pub static TEST: TestWire = TestWire;

    fn framed(header: String, payload: &[u8]) -> Bytes {
        let mut out = header.into_bytes();
        out.push(b'\n');
        out.extend_from_slice(payload);
        Bytes::from(out)
    }

    /// A frame's header line and payload.
    pub fn parse(frame: &[u8]) -> (String, Vec<u8>) {
        let at = frame
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(frame.len());
        let rest = frame.get(at + 1..).unwrap_or_default();
        (
            String::from_utf8_lossy(&frame[..at]).into_owned(),
            rest.to_vec(),
        )
    }

    impl Wire for TestWire {
        /// Tests give an outbox this wire alone, so its id may be any (a real wire's too).
        fn id(&self) -> WireId {
            const ID: WireId = WireId::new(0);
            ID
        }
        fn name(&self) -> &'static str {
            "test"
        }
        fn update(&self, _: &DocId, update: &[u8], position: Position) -> Bytes {
            framed(format!("update {position}"), update)
        }
        fn synced(&self, _: &DocId, update: &[u8], position: Position, answer: Answer) -> Parts {
            let kind = match answer {
                Answer::Replay => "replay",
                Answer::State => "state",
            };
            one(framed(format!("synced {kind} {position}"), update))
        }
        fn awareness(&self, _: &DocId, raw: &[u8]) -> Option<Bytes> {
            Some(framed("awareness".into(), raw))
        }
        fn ack(&self, _: &DocId, seq: Option<u64>, position: Position) -> Option<Bytes> {
            Some(framed(format!("ack {seq:?} {position}"), &[]))
        }
        fn error(&self, _: &DocId, _: ErrorCode, message: &str) -> Option<Bytes> {
            Some(framed("error".into(), message.as_bytes()))
        }
        fn join(&self) -> Join {
            Join::Answer
        }
    }
}
