//! One open document on the client: the local yrs replica, its resume position, and local updates not yet acknowledged.

use crate::presence::Presence;
use chorus_protocol::Position;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use yrs::types::Delta;
use yrs::types::text::TextEvent;
use yrs::updates::decoder::Decode;
use yrs::{
    Doc, GetString, Observable, OffsetKind, Options, Out, ReadTxn, StateVector, Text, TextRef,
    Transact, Update,
};

/// The name of the shared text inside every document (what the demo and `ChorusDoc.text` use).
pub const TEXT_NAME: &str = "text";

/// Transactions made through the text API carry this origin; the observer skips them, since
/// the caller already knows what it typed.
const LOCAL_TEXT: &str = "chorus:local-text";

/// One operation of a text change, in UTF-16 code units (what JavaScript strings index by).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TextOp {
    Retain { retain: u32 },
    Insert { insert: String },
    Delete { delete: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("undecodable update: {0}")]
    Decode(#[from] yrs::encoding::read::Error),
    #[error("update could not be applied: {0}")]
    Apply(String),
    #[error("index {index} is past the end of the text ({len})")]
    OutOfRange { index: u32, len: u32 },
}

/// What survives a page reload (`persist`/`restore`): enough to resume by position instead of
/// fetching the whole document, and the local edits the server never confirmed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Persisted {
    pub position: Option<Position>,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    pub pending: Vec<(u64, serde_bytes::ByteBuf)>,
    pub next_seq: u64,
}

#[derive(Debug)]
pub struct DocState {
    pub(crate) doc: Doc,
    text: TextRef,
    /// Last position received from the server; only moves forward within an epoch.
    pub(crate) position: Option<Position>,
    /// Local updates sent (or to send) and not yet acknowledged, by seq. Resent after every
    /// reconnect: a CRDT update applies once, so a duplicate is harmless.
    pub(crate) pending: BTreeMap<u64, Vec<u8>>,
    pub(crate) next_seq: u64,
    pub(crate) synced: bool,
    pub(crate) presence: Presence,
    deltas: Arc<Mutex<Vec<Vec<TextOp>>>>,
    /// Whether remote text changes are turned into deltas at all. A document bound to a
    /// Y.Doc (ChorusProvider) has nobody reading them, and computing a delta copies every
    /// inserted string (a 2 MB join built a 2 MB delta nobody read).
    text_events: Arc<AtomicBool>,
}

impl DocState {
    pub fn new() -> Self {
        let doc = Doc::with_options(Options {
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let text = doc.get_or_insert_text(TEXT_NAME);
        let deltas: Arc<Mutex<Vec<Vec<TextOp>>>> = Arc::default();
        let sink = deltas.clone();
        let text_events = Arc::new(AtomicBool::new(true));
        let wanted = text_events.clone();
        text.observe("chorus", move |txn, event: &TextEvent| {
            let local = txn
                .origin()
                .is_some_and(|o| o.as_ref() == LOCAL_TEXT.as_bytes());
            if local || !wanted.load(Ordering::Relaxed) {
                return;
            }
            let ops = event.delta(txn).iter().map(to_op).collect();
            if let Ok(mut d) = sink.lock() {
                d.push(ops);
            }
        });
        let presence = Presence::new(doc.client_id().get());
        DocState {
            doc,
            text,
            position: None,
            pending: BTreeMap::new(),
            next_seq: 1,
            synced: false,
            presence,
            deltas,
            text_events,
        }
    }

    pub fn client_id(&self) -> u64 {
        self.presence.client_id()
    }

    pub fn text(&self) -> String {
        self.text.get_string(&self.doc.transact())
    }

    /// Length of the text in UTF-16 code units.
    pub fn text_len(&self) -> u32 {
        self.text.len(&self.doc.transact())
    }

    pub fn state_vector(&self) -> Vec<u8> {
        use yrs::updates::encoder::Encode;
        self.doc.transact().state_vector().encode_v1()
    }

    /// The whole document as one v1 update.
    pub fn encode_state(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// Inserts at a UTF-16 index; returns the v1 update to queue.
    pub fn insert(&mut self, index: u32, chunk: &str) -> Result<Vec<u8>, DocError> {
        let len = self.text_len();
        if index > len {
            return Err(DocError::OutOfRange { index, len });
        }
        let mut txn = self.doc.transact_mut_with(LOCAL_TEXT);
        self.text.insert(&mut txn, index, chunk);
        Ok(txn.encode_update_v1())
    }

    /// Deletes `count` UTF-16 code units at `index`; returns the v1 update to queue.
    pub fn delete(&mut self, index: u32, count: u32) -> Result<Vec<u8>, DocError> {
        let len = self.text_len();
        if index.saturating_add(count) > len {
            return Err(DocError::OutOfRange {
                index: index.saturating_add(count),
                len,
            });
        }
        let mut txn = self.doc.transact_mut_with(LOCAL_TEXT);
        self.text.remove_range(&mut txn, index, count);
        Ok(txn.encode_update_v1())
    }

    /// Applies a v1 update (from the server, or raw from the application); text changes it
    /// causes are collected for [`DocState::take_deltas`].
    pub fn apply(&mut self, update: &[u8]) -> Result<(), DocError> {
        let update = Update::decode_v1(update)?;
        let mut txn = self.doc.transact_mut();
        txn.apply_update(update)
            .map_err(|e| DocError::Apply(e.to_string()))
    }

    /// Turns text-change deltas ([`DocState::take_deltas`], `Event::TextChanged`) on or off
    /// (on by default).
    pub fn set_text_events(&mut self, on: bool) {
        self.text_events.store(on, Ordering::Relaxed);
    }

    pub fn take_deltas(&mut self) -> Vec<Vec<TextOp>> {
        self.deltas
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    /// Queues a local update under a new seq and returns the seq.
    pub fn queue(&mut self, update: Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(seq, update);
        seq
    }

    /// Moves the position forward; positions of another epoch, or older ones, are ignored
    /// (only a `synced` frame may change the epoch).
    pub fn advance(&mut self, to: Position) {
        match self.position {
            Some(p) if p.epoch == to.epoch && p.id >= to.id => {}
            Some(p) if p.epoch != to.epoch => {}
            _ => self.position = Some(to),
        }
    }

    /// The last position received (what the next subscribe resumes from).
    pub fn persist_position(&self) -> Option<Position> {
        self.position
    }

    /// Whether the `synced` answer arrived on the current connection.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Seqs of local updates not yet acknowledged.
    pub fn pending_seqs(&self) -> Vec<u64> {
        self.pending.keys().copied().collect()
    }

    /// Everyone's presence (me included), client id → JSON text.
    pub fn presence_states(&self) -> BTreeMap<u64, Arc<str>> {
        self.presence.states()
    }

    pub fn persist(&self) -> Persisted {
        Persisted {
            position: self.position,
            state: self.encode_state(),
            pending: self
                .pending
                .iter()
                .map(|(s, u)| (*s, serde_bytes::ByteBuf::from(u.clone())))
                .collect(),
            next_seq: self.next_seq,
        }
    }

    /// Restores a persisted replica into a fresh document (before it is subscribed). The
    /// restored content is not reported as a remote change.
    pub fn restore(&mut self, saved: Persisted) -> Result<(), DocError> {
        // The saved state already contains the pending edits.
        self.apply(&saved.state)?;
        self.take_deltas();
        self.position = saved.position;
        self.pending = saved
            .pending
            .into_iter()
            .map(|(s, u)| (s, u.into_vec()))
            .collect();
        self.next_seq = saved
            .next_seq
            .max(self.pending.keys().last().map_or(1, |s| s + 1));
        Ok(())
    }
}

impl Default for DocState {
    fn default() -> Self {
        Self::new()
    }
}

fn to_op(d: &Delta<Out>) -> TextOp {
    match d {
        Delta::Retain(n, _) => TextOp::Retain { retain: *n },
        Delta::Deleted(n) => TextOp::Delete { delete: *n },
        Delta::Inserted(v, _) => TextOp::Insert {
            insert: match v {
                Out::Any(yrs::Any::String(s)) => s.to_string(),
                // An embed takes one index, like in Yjs; show it as U+FFFC (object replacement).
                _ => "\u{fffc}".to_string(),
            },
        },
    }
}
