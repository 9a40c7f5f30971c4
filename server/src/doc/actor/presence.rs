//! A document's owner, presence (data-flow step 8): awareness states per client id, who may
//! set which, relaying them to local clients and other nodes, and forgetting old tombstones.

use super::Owner;
use crate::backplane::now_ms;
use crate::doc::wire::MAX_WIRES;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use yrs::ClientID;
use yrs::sync::Awareness;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

/// Awareness client ids one connection may introduce per document. A Yjs client uses one
/// (its document's client id); a few more leave room for clients that hold several docs
/// under one socket id scheme, without letting one socket flood everyone's presence.
pub(crate) const MAX_AWARENESS_IDS: usize = 8;

/// See `Owner::note_departed`.
const AWARENESS_COMPACT_EVERY: usize = 64;
const AWARENESS_TOMBSTONE_GRACE_MS: u64 = 30_000;

impl Owner {
    pub(super) fn send_awareness_snapshot(&self, conn: u64) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let Ok(update) = self.awareness.update() else {
            return;
        };
        if update.clients.is_empty() {
            return;
        }
        let raw = update.encode_v1();
        if let Some(frame) = sub.outbox.wire.awareness(&self.doc, &raw) {
            sub.outbox
                .push_awareness(&self.doc, frame, Bytes::from(raw));
        }
    }

    /// yrs keeps a removed client's clock forever (a tombstone, so that a late copy of its
    /// old state is not taken as new). Clients come and go, so after every
    /// [`AWARENESS_COMPACT_EVERY`] removals the tombstones of clients last heard of more than
    /// [`AWARENESS_TOMBSTONE_GRACE_MS`] ago are dropped: by then no late copy of their state
    /// can still be on its way (y-protocols itself forgets states after 30 s of silence).
    pub(super) fn note_departed(&mut self, n: usize) {
        self.departed += n;
        if self.departed < AWARENESS_COMPACT_EVERY {
            return;
        }
        self.departed = 0;
        if let Some(fresh) = without_old_tombstones(&self.awareness, now_ms()) {
            self.awareness = fresh;
        }
    }

    pub(super) fn apply_remote_awareness(&mut self, node: u64, raw: &[u8]) {
        let Ok(update) = yrs::sync::awareness::AwarenessUpdate::decode_v1(raw) else {
            return; // validated by the publishing node; nothing else writes this stream
        };
        // A removal (state `null`) ends that node's claim, so the client may reappear through
        // any node (a reconnect through the load balancer).
        let claims = self.remote_awareness.entry(node).or_default();
        let mut departed = 0;
        for (id, entry) in &update.clients {
            if &*entry.json == "null" {
                claims.remove(id);
                departed += 1;
            } else {
                claims.insert(*id);
            }
        }
        if let Ok(Some(summary)) = self.awareness.apply_update_summary(update)
            && let Ok(changed) = self.awareness.update_with_clients(summary.all_changes())
        {
            self.broadcast_awareness(None, &changed.encode_v1());
        }
        self.note_departed(departed);
    }

    pub(super) fn remove_node_awareness(&mut self, node: u64) {
        let Some(ids) = self.remote_awareness.remove(&node) else {
            return;
        };
        let ids: Vec<ClientID> = ids.into_iter().collect();
        for id in &ids {
            self.awareness.remove_state(*id);
        }
        let departed = ids.len();
        if let Ok(update) = self.awareness.update_with_clients(ids) {
            self.broadcast_awareness(None, &update.encode_v1());
        }
        self.note_departed(departed);
    }

    pub(super) fn apply_awareness(
        &mut self,
        conn: u64,
        update: yrs::sync::awareness::AwarenessUpdate,
    ) {
        let Some(sub) = self.subs.get(&conn) else {
            return;
        };
        let mut introduced = 0;
        let mut foreign = false;
        for id in update.clients.keys() {
            if sub.awareness_ids.contains(id) {
                continue;
            }
            introduced += 1;
            foreign |= self.awareness_owner.contains_key(id)
                || self.remote_awareness.values().any(|ids| ids.contains(id));
        }
        if foreign || sub.awareness_ids.len() + introduced > MAX_AWARENESS_IDS {
            // All or nothing: a partly applied update would still move someone else's cursor.
            self.shared
                .refused_awareness
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(doc = %self.doc, conn, foreign, "awareness update refused");
            let message = if foreign {
                "the awareness update touches a client id another connection introduced"
            } else {
                "this socket already introduced the most awareness client ids allowed"
            };
            let code = chorus_protocol::ErrorCode::AwarenessNotOwned;
            if let Some(frame) = sub.outbox.wire.error(&self.doc, code, message) {
                sub.outbox.push_control(frame);
            }
            return;
        }
        let ids: Vec<ClientID> = update.clients.keys().copied().collect();
        if let Some(sub) = self.subs.get_mut(&conn) {
            sub.awareness_ids.extend(ids.iter().copied());
        }
        for id in ids {
            self.awareness_owner.insert(id, conn);
        }
        let departed = update
            .clients
            .values()
            .filter(|e| &*e.json == "null")
            .count();
        self.note_departed(departed);
        match self.awareness.apply_update_summary(update) {
            Ok(Some(summary)) => {
                if let Ok(changed) = self.awareness.update_with_clients(summary.all_changes()) {
                    let raw = changed.encode_v1();
                    self.broadcast_awareness(Some(conn), &raw);
                    self.shared
                        .backplane
                        .publish_awareness(&self.doc, Bytes::from(raw));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(doc = %self.doc, error = %e, "awareness update ignored"),
        }
    }

    pub(super) fn broadcast_awareness(&self, except: Option<u64>, raw: &[u8]) {
        let raw = Bytes::copy_from_slice(raw);
        // Once per wire in use, shared by its recipients (`None` inside: a wire without
        // presence).
        let mut frames: [Option<Option<Bytes>>; MAX_WIRES] = Default::default();
        for (conn, sub) in &self.subs {
            if Some(*conn) == except {
                continue;
            }
            let frame = frames[sub.outbox.wire_id().index()]
                .get_or_insert_with(|| sub.outbox.wire.awareness(&self.doc, &raw));
            if let Some(frame) = frame {
                sub.outbox
                    .push_awareness(&self.doc, frame.clone(), raw.clone());
            }
        }
    }
}

/// `awareness` without the tombstones whose client was last heard of more than
/// [`AWARENESS_TOMBSTONE_GRACE_MS`] before `now` (ms; yrs stamps a state when it is set, not
/// when it is removed), or `None` when it has none. yrs has no way to forget one client, so a fresh
/// awareness over the same document takes what is kept: live states and recent tombstones,
/// clocks unchanged.
fn without_old_tombstones(awareness: &Awareness, now: u64) -> Option<Awareness> {
    let mut keep = HashMap::new();
    let mut dropped = 0usize;
    for (id, state) in awareness.iter() {
        let json = match state.data {
            Some(json) => json,
            None if now.saturating_sub(state.last_updated) < AWARENESS_TOMBSTONE_GRACE_MS => {
                "null".into()
            }
            None => {
                dropped += 1;
                continue;
            }
        };
        let clock = state.clock;
        keep.insert(id, AwarenessUpdateEntry { clock, json });
    }
    if dropped == 0 {
        return None;
    }
    let mut fresh = Awareness::new(awareness.doc().clone());
    if let Err(e) = fresh.apply_update(AwarenessUpdate { clients: keep }) {
        tracing::warn!(error = %e, "awareness could not be compacted");
        return None;
    }
    tracing::debug!(dropped, "awareness tombstones dropped");
    Some(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use yrs::Doc;

    #[test]
    fn departed_awareness_clients_are_forgotten_after_the_grace_period() {
        let mut aw = Awareness::new(Doc::new());
        let entry = |clock, json: &str| AwarenessUpdateEntry {
            clock,
            json: json.into(),
        };
        let clients = (1..=100u64)
            .map(|id| (ClientID::new(id), entry(3, "{\"x\":1}")))
            .collect();
        aw.apply_update(AwarenessUpdate { clients }).expect("apply");
        for id in 2..=100u64 {
            aw.remove_state(ClientID::new(id));
        }
        assert_eq!(aw.iter().count(), 100, "yrs keeps every tombstone");
        let now = now_ms();
        assert!(
            without_old_tombstones(&aw, now).is_none(),
            "within the grace period nothing is dropped"
        );
        let fresh = without_old_tombstones(&aw, now + AWARENESS_TOMBSTONE_GRACE_MS + 1)
            .expect("old tombstones dropped");
        assert_eq!(fresh.iter().count(), 1, "only the live client is left");
        assert_eq!(
            fresh.meta(ClientID::new(1)).map(|m| m.0),
            Some(3),
            "clock kept"
        );
        assert_eq!(
            fresh.state::<serde_json::Value>(ClientID::new(1)),
            Some(serde_json::json!({"x": 1}))
        );
    }

    #[test]
    fn a_recent_tombstone_is_kept_and_still_refuses_a_late_copy_of_the_old_state() {
        use std::sync::atomic::AtomicU64;
        let t0 = 1_000_000_000u64;
        let now = Arc::new(AtomicU64::new(t0));
        let clock = now.clone();
        let mut aw = Awareness::with_clock(Doc::new(), move || clock.load(Ordering::Relaxed));
        let update = |entries: &[(u64, u32, &str)]| AwarenessUpdate {
            clients: entries
                .iter()
                .map(|(id, clock, json)| {
                    let entry = AwarenessUpdateEntry {
                        clock: *clock,
                        json: (*json).into(),
                    };
                    (ClientID::new(*id), entry)
                })
                .collect(),
        };
        aw.apply_update(update(&[(1, 5, "{}"), (2, 5, "{}")]))
            .expect("apply");
        aw.remove_state(ClientID::new(2));
        // yrs stamps a state when it is set, not when it is removed.
        now.store(t0 + 20_000, Ordering::Relaxed);
        aw.apply_update(update(&[(1, 6, "{}")])).expect("apply");
        aw.remove_state(ClientID::new(1));
        let mut fresh = without_old_tombstones(&aw, t0 + 35_000).expect("2's tombstone is old");
        assert_eq!(fresh.iter().count(), 1, "1's tombstone is recent and kept");
        assert_eq!(fresh.meta(ClientID::new(1)).map(|m| m.0), Some(7));
        // A late copy of client 1's old state is still refused...
        fresh.apply_update(update(&[(1, 6, "{}")])).expect("apply");
        assert_eq!(fresh.state::<serde_json::Value>(ClientID::new(1)), None);
        // ...while client 2, forgotten, may come back with any clock.
        fresh.apply_update(update(&[(2, 1, "{}")])).expect("apply");
        assert!(fresh.state::<serde_json::Value>(ClientID::new(2)).is_some());
    }
}
