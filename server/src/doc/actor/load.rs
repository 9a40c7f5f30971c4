//! A document's owner, loading (data-flow step 2): the newest snapshot and the log after it;
//! a large snapshot integrates off the owner task while whole-document joins are answered
//! from its bytes.

use super::{Owner, recover, refuse};
use crate::doc::wire::Join;
use crate::doc::{Command, DocError};
use bytes::Bytes;
use chorus_protocol::Position;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Transact, Update};

/// Snapshots at least this big are integrated off the owner task, while joins that want the
/// whole document are answered with the stored bytes (yrs takes about 70 ms per MB to decode
/// and integrate a document; the bytes are already the answer).
const ANSWER_WHILE_LOADING: usize = 256 * 1024;

impl Owner {
    pub(super) async fn load(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), String> {
        let recover::Whole {
            snapshot,
            head,
            entries,
        } = self.read_whole().await?;
        self.epoch = head.epoch;
        if let Some(s) = snapshot {
            self.handle
                .inner
                .approx_size
                .store(s.state.len(), Ordering::Relaxed);
            let current = s.position.epoch == head.epoch;
            if current {
                self.applied = s.position.id;
                self.snapshot = Some(s.position);
            }
            // The snapshot is the whole document when the log holds nothing after it.
            let whole = current && entries.iter().all(|e| e.id <= s.position.id);
            if whole && s.state.len() >= ANSWER_WHILE_LOADING {
                // The snapshot's bytes are the whole document at its position: joins answered
                // while it integrates take their frames from them (`whole_answer`).
                *self.full_state.get_mut() = Some((s.position, s.state.clone()));
                self.integrate_answering(s.state, commands).await?;
            } else {
                let update = Update::decode_v1(&s.state)
                    .map_err(|e| format!("snapshot does not decode: {e}"))?;
                self.awareness
                    .doc()
                    .transact_mut()
                    .apply_update(update)
                    .map_err(|e| format!("snapshot does not apply: {e}"))?;
            }
        }
        self.recent_floor = head.floor;
        self.ingest(entries);
        let sv = self.awareness.doc().transact().state_vector();
        self.handle
            .publish_known(sv.iter().map(|(c, k)| (*c, *k)), true);
        Ok(())
    }

    /// Integrates a large snapshot on a blocking thread and, meanwhile, answers joins that
    /// want the whole document with the snapshot's own bytes: a cold load costs the client a
    /// file read and a send, not the integration. Each connection's commands stay in order:
    /// from its first one that needs the integrated document on, its later ones wait too.
    pub(super) async fn integrate_answering(
        &mut self,
        state: Bytes,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), String> {
        let doc = self.awareness.doc().clone();
        let bytes = state.clone();
        let handle = self.handle.clone();
        let integrate = self.shared.tracker.spawn_blocking(move || {
            let update =
                Update::decode_v1(&bytes).map_err(|e| format!("snapshot does not decode: {e}"))?;
            // Clients answered early may write at once; what they build on is the snapshot,
            // and their appends apply after it, so the write path may count it as known now
            // (a snapshot starts every client at clock 0, where yrs's state vector is exact).
            handle.publish_known(update.state_vector().iter().map(|(c, k)| (*c, *k)), true);
            doc.transact_mut()
                .apply_update(update)
                .map_err(|e| format!("snapshot does not apply: {e}"))
        });
        tokio::pin!(integrate);
        let position = self.position();
        let mut waiting: Vec<Command> = Vec::new();
        let mut blocked: HashSet<u64> = HashSet::new();
        // Joins that offer our state vector (`Join::Offer`) owe the offer until there is one.
        let mut offer_owed: Vec<u64> = Vec::new();
        let integrated = loop {
            tokio::select! {
                done = &mut integrate => break done,
                Some(cmd) = commands.recv() => {
                    let conn = cmd.conn();
                    if conn.is_some_and(|c| blocked.contains(&c)) {
                        waiting.push(cmd);
                        continue;
                    }
                    if let Some(cmd) = self.answer_from_state(cmd, &state, position, &mut offer_owed) {
                        blocked.extend(conn);
                        waiting.push(cmd);
                    }
                }
            }
        };
        let integrated = integrated
            .map_err(|e| format!("snapshot integration failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = integrated {
            // Joins answered from the bytes are told to go elsewhere and come back.
            for sub in self.subs.values() {
                sub.outbox
                    .request_close(chorus_protocol::CloseCode::InternalError);
            }
            for cmd in waiting {
                refuse(cmd, DocError::Unavailable);
            }
            return Err(e);
        }
        if !offer_owed.is_empty() {
            // One state vector for every join that waited for it.
            let sv = self.awareness.doc().transact().state_vector().encode_v1();
            for conn in offer_owed {
                if let Some(sub) = self.subs.get(&conn)
                    && let Join::Offer(offer) = sub.outbox.wire.join()
                {
                    sub.outbox.push_frame(&self.doc, offer(&self.doc, &sv));
                }
            }
        }
        for cmd in waiting {
            self.handle_command(cmd).await;
        }
        Ok(())
    }

    /// While a snapshot integrates: answers `cmd` from the snapshot's bytes if it only needs
    /// the whole document; gives it back otherwise.
    pub(super) fn answer_from_state(
        &mut self,
        cmd: Command,
        state: &Bytes,
        position: Position,
        offer_owed: &mut Vec<u64>,
    ) -> Option<Command> {
        let answered = || {
            metrics::counter!(crate::metrics::names::ANSWERED_WHILE_LOADING).increment(1);
        };
        match cmd {
            Command::Subscribe { sub, from, reply }
                if from.position.is_none()
                    && from.state_vector.as_ref().is_none_or(|sv| sv.is_empty()) =>
            {
                let _ = reply.send(Ok(()));
                let conn = sub.conn;
                let wire = sub.outbox.wire;
                self.add_sub(sub);
                match wire.join() {
                    Join::Answer => {
                        answered();
                        let frame = self.whole_answer(wire);
                        self.subs[&conn]
                            .outbox
                            .push_synced(&self.doc, frame, position)
                    }
                    // The client asks with its own state vector (answered below); our offer
                    // follows once we have a state vector.
                    Join::Offer(_) => offer_owed.push(conn),
                }
                self.send_awareness_snapshot(conn);
                None
            }
            Command::Diff { conn, state_vector }
                if state_vector.is_empty() && self.subs.contains_key(&conn) =>
            {
                answered();
                let outbox = &self.subs[&conn].outbox;
                let frame = self.whole_answer(outbox.wire);
                outbox.push_synced(&self.doc, frame, position);
                None
            }
            Command::State { reply } => {
                answered();
                let _ = reply.send((state.to_vec(), position));
                None
            }
            other => Some(other),
        }
    }
}
