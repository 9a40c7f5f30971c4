//! A document's owner, answering (data-flow step 3): exact replay from the entries kept in
//! memory, or the state diff against what the client has.

use super::Owner;
use crate::doc::SyncFrom;
use crate::doc::outbox::Proto;
use bytes::Bytes;
use chorus_protocol::y_websocket as yws;
use chorus_protocol::{Position, encode};
use std::panic::{AssertUnwindSafe, catch_unwind};
use yrs::{ReadTxn, StateVector, Transact, Update};

/// Replays larger than this are compared with the state diff, and the smaller one is sent.
const LARGE_REPLAY: usize = 64 * 1024;

impl Owner {
    /// Brings one subscriber up to the current position: exact replay when its position is
    /// still in memory, otherwise a diff against its state vector (or the whole document).
    /// Always with content, for either protocol: a catch-up that only offered our state vector
    /// would leave a stock y-websocket client, which has already sent its own step 1, without
    /// the document.
    pub(super) fn send_sync(&self, conn: u64, from: &SyncFrom) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let position = self.position();
        let wants_all = from.state_vector.as_ref().is_none_or(|sv| sv.is_empty());
        let replay = from.position.and_then(|p| self.replay_after(p));
        if replay.is_none() && wants_all {
            let frame = self.whole_answer(sub.outbox.proto);
            sub.outbox.push_synced(&self.doc, frame, position);
            return;
        }
        let state_diff = || self.encode_diff(&from.state_vector.clone().unwrap_or_default());
        let (update, replay) = match replay {
            Some(update) if update.len() <= LARGE_REPLAY => (update, true),
            Some(update) => {
                // A long replay can be far larger than the state it leads to (a value
                // overwritten many times): send whichever is smaller. Both bring the client
                // to `position`; the state is a superset of what it had.
                let state = state_diff();
                if state.len() < update.len() {
                    (state, false)
                } else {
                    (update, true)
                }
            }
            None => (state_diff(), false),
        };
        let frame = match sub.outbox.proto {
            Proto::Native => {
                Bytes::from(encode::synced(self.doc.as_str(), &update, position, replay))
            }
            Proto::Yjs => Bytes::from(yws::sync_step2(&update)),
        };
        sub.outbox.push_synced(&self.doc, frame, position);
    }

    /// The entries after `p`, merged, if `p` is a position we can replay from exactly.
    pub(super) fn replay_after(&self, p: Position) -> Option<Vec<u8>> {
        // Epoch 0 (no log yet) is never replayed from: see `LogHead`.
        if p.epoch == 0 || p.epoch != self.epoch || p.id < self.recent_floor || p.id > self.applied
        {
            return None;
        }
        let start = self.recent.partition_point(|(id, _)| *id <= p.id);
        let missed: Vec<&[u8]> = self
            .recent
            .range(start..)
            .map(|(_, u)| u.as_ref())
            .collect();
        match missed.len() {
            0 => Some(Update::EMPTY_V1.to_vec()),
            1 => Some(missed[0].to_vec()),
            _ => yrs::merge_updates_v1(missed).ok(),
        }
    }

    pub(super) fn encode_diff(&self, sv: &StateVector) -> Vec<u8> {
        if sv.is_empty() {
            return self.encode_whole().to_vec();
        }
        self.encode_against(sv)
    }

    pub(super) fn encode_against(&self, sv: &StateVector) -> Vec<u8> {
        let txn = self.awareness.doc().transact();
        catch_unwind(AssertUnwindSafe(|| txn.encode_state_as_update_v1(sv))).unwrap_or_else(|_| {
            tracing::error!(doc = %self.doc, "document failed to encode");
            Update::EMPTY_V1.to_vec()
        })
    }

    /// The whole document framed for `proto` at the current position (cached: see
    /// `Owner::whole_answers`).
    pub(super) fn whole_answer(&self, proto: Proto) -> Bytes {
        let position = self.position();
        let slot = match proto {
            Proto::Native => 0,
            Proto::Yjs => 1,
        };
        if let Some((at, frame)) = &self.whole_answers.borrow()[slot]
            && *at == position
        {
            return frame.clone();
        }
        let state = self.encode_whole();
        let frame = Bytes::from(match proto {
            Proto::Native => encode::synced(self.doc.as_str(), &state, position, false),
            Proto::Yjs => yws::sync_step2(&state),
        });
        self.whole_answers.borrow_mut()[slot] = Some((position, frame.clone()));
        frame
    }

    /// The document changed without its position moving past the cached copies (a reload):
    /// drop them.
    pub(super) fn forget_encoded(&mut self) {
        *self.full_state.get_mut() = None;
        *self.whole_answers.get_mut() = [None, None];
    }

    /// The whole document, from the cache when it is still at the current position.
    pub(super) fn encode_whole(&self) -> Bytes {
        let position = self.position();
        if let Some((at, state)) = &*self.full_state.borrow()
            && *at == position
        {
            return state.clone();
        }
        let state = Bytes::from(self.encode_against(&StateVector::default()));
        *self.full_state.borrow_mut() = Some((position, state.clone()));
        state
    }
}
