//! Presence (awareness) of one document: my state out, peers' states in, in the y-protocols encoding the server relays.
//!
//! Why not `yrs::sync::Awareness`: a client must forget every peer when its socket drops (the
//! server's snapshot on the next subscribe is the truth, and a peer that left meanwhile would
//! otherwise linger forever), yet keep its own clock rising. `Awareness` can only forget a peer
//! by bumping that peer's clock, after which the server's snapshot of the same peer would be
//! ignored. The protocol is small (client id → clock, JSON), so this module keeps the map itself
//! and reuses yrs only for the wire encoding. It also needs no wall clock, which in wasm32 would
//! panic through `std::time`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use yrs::block::ClientID;
use yrs::encoding::read::Error as ReadError;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

const NULL: &str = "null";

/// What an incoming awareness update changed, by client id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub added: Vec<u64>,
    pub updated: Vec<u64>,
    pub removed: Vec<u64>,
}

impl PresenceChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug)]
pub struct Presence {
    client_id: u64,
    clock: u32,
    local: Option<Arc<str>>,
    /// Peers: clock and state (`None` once removed; the clock is kept so an older message
    /// cannot resurrect them).
    remote: HashMap<u64, (u32, Option<Arc<str>>)>,
}

impl Presence {
    pub fn new(client_id: u64) -> Self {
        Presence {
            client_id,
            clock: 0,
            local: None,
            remote: HashMap::new(),
        }
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }

    /// Sets my state (a JSON text; `None` clears it) and returns the update to send.
    pub fn set_local(&mut self, json: Option<&str>) -> Vec<u8> {
        self.clock = self.clock.wrapping_add(1);
        self.local = json.map(Arc::from);
        self.encode_local()
    }

    /// My state again for a fresh socket. The clock moves by two: if the server still knew
    /// this client it removed it on disconnect with `clock + 1`, and an equal clock would be
    /// ignored.
    pub fn reannounce(&mut self) -> Option<Vec<u8>> {
        self.local.as_ref()?;
        self.clock = self.clock.wrapping_add(2);
        Some(self.encode_local())
    }

    fn encode_local(&self) -> Vec<u8> {
        let json = self.local.clone().unwrap_or_else(|| Arc::from(NULL));
        let mut clients = HashMap::new();
        clients.insert(
            ClientID::new(self.client_id),
            AwarenessUpdateEntry {
                clock: self.clock,
                json,
            },
        );
        AwarenessUpdate { clients }.encode_v1()
    }

    /// Applies a relayed update with the y-protocols rules (a newer clock wins; a `null` at the
    /// same clock removes). If it removes *me* (the server timed out an old socket of mine after
    /// I reconnected), the second value is my state re-sent with a higher clock.
    pub fn apply(&mut self, bytes: &[u8]) -> Result<(PresenceChange, Option<Vec<u8>>), ReadError> {
        let update = AwarenessUpdate::decode_v1(bytes)?;
        let mut change = PresenceChange::default();
        let mut resend = None;
        for (id, entry) in update.clients {
            let id = id.get();
            let state = (entry.json.as_ref() != NULL).then_some(entry.json);
            if id == self.client_id {
                if state.is_none() && self.local.is_some() && entry.clock >= self.clock {
                    self.clock = entry.clock.wrapping_add(1);
                    resend = Some(self.encode_local());
                }
                continue;
            }
            match self.remote.get_mut(&id) {
                Some((clock, current)) => {
                    let removal = *clock == entry.clock && state.is_none() && current.is_some();
                    if *clock < entry.clock || removal {
                        match (&current, &state) {
                            (Some(_), None) => change.removed.push(id),
                            (None, Some(_)) => change.added.push(id),
                            (Some(a), Some(b)) if a != b => change.updated.push(id),
                            _ => {}
                        }
                        *clock = entry.clock;
                        *current = state;
                    }
                }
                None => {
                    if state.is_some() {
                        change.added.push(id);
                    }
                    self.remote.insert(id, (entry.clock, state));
                }
            }
        }
        Ok((change, resend))
    }

    /// Forgets every peer (the socket closed: who is still there is unknown until the server's
    /// snapshot arrives on the next subscribe). Returns the ids that were visible.
    pub fn forget_peers(&mut self) -> Vec<u64> {
        let mut gone: Vec<u64> = self
            .remote
            .drain()
            .filter_map(|(id, (_, s))| s.map(|_| id))
            .collect();
        gone.sort_unstable();
        gone
    }

    /// Everyone visible, me included (when I have a state), ordered by client id.
    pub fn states(&self) -> BTreeMap<u64, Arc<str>> {
        let mut all: BTreeMap<u64, Arc<str>> = self
            .remote
            .iter()
            .filter_map(|(id, (_, s))| s.clone().map(|s| (*id, s)))
            .collect();
        if let Some(me) = &self.local {
            all.insert(self.client_id, me.clone());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_update(id: u64, clock: u32, json: &str) -> Vec<u8> {
        let mut clients = HashMap::new();
        clients.insert(
            ClientID::new(id),
            AwarenessUpdateEntry {
                clock,
                json: Arc::from(json),
            },
        );
        AwarenessUpdate { clients }.encode_v1()
    }

    #[test]
    fn peers_are_added_updated_and_removed_by_clock() {
        let mut p = Presence::new(1);
        let (c, _) = p
            .apply(&peer_update(2, 1, r#"{"name":"b"}"#))
            .expect("apply");
        assert_eq!(c.added, [2]);
        let (c, _) = p
            .apply(&peer_update(2, 2, r#"{"name":"B"}"#))
            .expect("apply");
        assert_eq!(c.updated, [2]);
        let (c, _) = p
            .apply(&peer_update(2, 1, r#"{"name":"old"}"#))
            .expect("apply");
        assert!(c.is_empty(), "an older clock is ignored");
        // The server's removal: null with the same or a higher clock.
        let (c, _) = p.apply(&peer_update(2, 3, NULL)).expect("apply");
        assert_eq!(c.removed, [2]);
        assert!(!p.states().contains_key(&2));
        assert!(p.apply(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn local_state_round_trips_through_a_peer() {
        let mut a = Presence::new(10);
        let mut b = Presence::new(20);
        let (c, _) = b.apply(&a.set_local(Some(r#"{"x":1}"#))).expect("apply");
        assert_eq!(c.added, [10]);
        assert_eq!(b.states()[&10].as_ref(), r#"{"x":1}"#);
        let (c, _) = b.apply(&a.set_local(None)).expect("apply");
        assert_eq!(c.removed, [10]);
    }

    #[test]
    fn forgetting_peers_lets_the_servers_snapshot_back_in() {
        let mut p = Presence::new(1);
        p.apply(&peer_update(2, 5, r#"{"n":1}"#)).expect("apply");
        assert_eq!(p.forget_peers(), [2]);
        // The same clock again (the peer did not change while we were away) must count.
        let (c, _) = p.apply(&peer_update(2, 5, r#"{"n":1}"#)).expect("apply");
        assert_eq!(c.added, [2]);
    }

    #[test]
    fn a_removal_of_myself_is_answered_with_a_higher_clock() {
        let mut me = Presence::new(1);
        me.set_local(Some("{}"));
        let mut server = Presence::new(99);
        server
            .apply(&me.reannounce().expect("state"))
            .expect("apply");
        // The server removes a stale socket's state with clock + 1.
        let (_, resend) = me.apply(&peer_update(1, 4, NULL)).expect("apply");
        let resend = resend.expect("re-announce");
        let (c, _) = server.apply(&peer_update(1, 4, NULL)).expect("apply");
        assert_eq!(c.removed, [1]);
        let (c, _) = server.apply(&resend).expect("apply");
        assert_eq!(c.added, [1], "the re-announced state wins over the removal");
    }
}
