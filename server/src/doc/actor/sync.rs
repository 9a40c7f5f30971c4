//! A document's owner, answering (data-flow step 3): exact replay from the entries kept in
//! memory, or the state diff against what the client has.

use super::Owner;
use crate::doc::SyncFrom;
use crate::doc::wire::{Answer, Parts, Wire};
use bytes::Bytes;
use chorus_protocol::Position;
use std::panic::{AssertUnwindSafe, catch_unwind};
use yrs::{ReadTxn, StateVector, Transact, Update};

/// Replays larger than this are compared with the state diff, and the smaller one is sent.
const LARGE_REPLAY: usize = 64 * 1024;

impl Owner {
    /// Brings one subscriber up to the current position: exact replay when its position is
    /// still in memory, otherwise a diff against its state vector (or the whole document).
    /// Always with content, whatever the wire's join: a catch-up that only offered our state
    /// vector would leave a stock y-websocket client, which has already sent its own step 1,
    /// without the document.
    pub(super) fn send_sync(&self, conn: u64, from: &SyncFrom) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let position = self.position();
        let wants_all = from.state_vector.as_ref().is_none_or(|sv| sv.is_empty());
        let replay = from.position.and_then(|p| self.replay_after(p));
        if replay.is_none() && wants_all {
            let frame = self.whole_answer(sub.outbox.wire);
            sub.outbox.push_synced(&self.doc, frame, position);
            return;
        }
        let state_diff = || self.encode_diff(&from.state_vector.clone().unwrap_or_default());
        let (update, answer) = match replay {
            Some(update) if update.len() <= LARGE_REPLAY => (update, Answer::Replay),
            Some(update) => {
                // A long replay can be far larger than the state it leads to (a value
                // overwritten many times): send whichever is smaller. Both bring the client
                // to `position`; the state is a superset of what it had.
                let state = state_diff();
                if state.len() < update.len() {
                    (state, Answer::State)
                } else {
                    (update, Answer::Replay)
                }
            }
            None => (state_diff(), Answer::State),
        };
        let frame = sub.outbox.wire.synced(&self.doc, &update, position, answer);
        sub.outbox.push_synced(&self.doc, frame, position);
    }

    /// Answers a client that sent its state vector and waits for what it lacks (see
    /// [`crate::doc::wire::Join::Offer`]); an empty state vector gets the cached whole answer.
    pub(super) fn send_diff(&self, conn: u64, state_vector: &StateVector) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let frame = if state_vector.is_empty() {
            self.whole_answer(sub.outbox.wire)
        } else {
            let diff = self.encode_against(state_vector);
            sub.outbox
                .wire
                .synced(&self.doc, &diff, self.position(), Answer::State)
        };
        sub.outbox.push_synced(&self.doc, frame, self.position());
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

    /// The whole document framed for `wire` at the current position (cached: see
    /// `Owner::whole_answers`).
    pub(super) fn whole_answer(&self, wire: &dyn Wire) -> Parts {
        let position = self.position();
        let slot = wire.id().index();
        if let Some((at, frame)) = &self.whole_answers.borrow()[slot]
            && *at == position
        {
            return frame.clone();
        }
        let state = self.encode_whole();
        let frame = wire.synced(&self.doc, &state, position, Answer::State);
        self.whole_answers.borrow_mut()[slot] = Some((position, frame.clone()));
        frame
    }

    /// The document changed without its position moving past the cached copies (a reload):
    /// drop them.
    pub(super) fn forget_encoded(&mut self) {
        *self.full_state.get_mut() = None;
        *self.whole_answers.get_mut() = Default::default();
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
