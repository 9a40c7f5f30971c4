//! Redis backplane, cluster topology (steps 4–5, cluster): which reader reads a doc, wake keys.

use super::Inner;
use super::conn::{Conn, lock, query, storage};
use super::keys::{HASH_SLOTS, slot_of};
use super::reader::spawn_reader;
use super::reply::{as_string, as_u64};
use crate::backplane::BackplaneResult;
use chorus_protocol::DocId;
use redis::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// How often every node re-reads the cluster's slot map (a reshard, a failover, a new master).
/// A reader whose query fails asks for a refresh at once, at most one per [`TOPOLOGY_GAP`].
const TOPOLOGY_REFRESH: Duration = Duration::from_secs(30);
const TOPOLOGY_GAP: Duration = Duration::from_secs(1);

/// Which documents each cluster shard reader owns and where to wake it. Two nodes that read
/// the same slot map pick the same wake key for each master (the first `w{i}` tag in its
/// slots), whatever order CLUSTER SLOTS lists the masters in.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Topology {
    /// slot → shard index.
    shard_of_slot: Vec<u16>,
    /// Per shard: the wake stream key (a hash tag inside that shard).
    pub(super) wake_keys: Vec<String>,
}

impl Topology {
    pub(super) fn single() -> Self {
        Topology {
            shard_of_slot: vec![0; HASH_SLOTS as usize],
            wake_keys: vec![String::new()],
        }
    }

    pub(super) fn shard(&self, doc: &DocId) -> usize {
        usize::from(self.shard_of_slot[usize::from(slot_of(doc.as_str()))])
    }

    /// The end (exclusive) of the run of slots from `start` that one master owns, at most
    /// `max` long: keys of those slots may go in one cross-slot script on that master.
    pub(super) fn same_master_until(&self, start: u16, max: u16) -> u16 {
        let Some(&owner) = self.shard_of_slot.get(usize::from(start)) else {
            return HASH_SLOTS;
        };
        let limit = start.saturating_add(max.max(1)).min(HASH_SLOTS);
        (start..limit)
            .find(|&s| self.shard_of_slot[usize::from(s)] != owner)
            .unwrap_or(limit)
    }
}

/// The current slot map and which shard readers run, under one lock so that a reader leaving
/// (its shard is gone) and a refresh adding that shard back cannot miss each other.
///
/// While a new map spreads (every node refreshes on its own), a document may briefly be read
/// by two readers of this node (harmless: each delivery moves the per-document cursor in
/// [`Watched`](super::Watched) only forward, and the document ignores entries it applied) or
/// by none, or be woken on a key nobody here blocks on: the timed full read (at least every
/// [`BLOCK`](super::reader::BLOCK)) of every shard reader picks it up within about a second.
pub(super) struct Shards {
    pub(super) topology: Arc<Topology>,
    readers: HashSet<usize>,
}

impl Shards {
    pub(super) fn new(topology: Topology) -> Self {
        Shards {
            topology: Arc::new(topology),
            readers: HashSet::new(),
        }
    }

    /// Installs a freshly read map; returns the shards that need a reader started (all of
    /// them the first time, then those a grown cluster added or whose reader left).
    pub(super) fn install(&mut self, topology: Topology) -> Vec<usize> {
        if *self.topology != topology {
            self.topology = Arc::new(topology);
        }
        let mut start: Vec<usize> = (0..self.topology.wake_keys.len())
            .filter(|s| !self.readers.contains(s))
            .collect();
        start.sort_unstable();
        self.readers.extend(start.iter().copied());
        start
    }

    /// The map for shard `shard`'s reader, or `None` (and the reader is forgotten) if the
    /// cluster has fewer masters now: that reader stops.
    pub(super) fn keep_reader(&mut self, shard: usize) -> Option<Arc<Topology>> {
        if shard < self.topology.wake_keys.len() {
            Some(self.topology.clone())
        } else {
            self.readers.remove(&shard);
            None
        }
    }
}

/// Cluster mode: re-reads the slot map every [`TOPOLOGY_REFRESH`], and soon after a reader
/// reports a failed query, so that a reshard or a new master changes which reader reads which
/// document and which wake key writers use (see [`Shards`] for the transition).
pub(super) async fn run_topology(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(TOPOLOGY_REFRESH) => {}
            _ = inner.topology_stale.notified() => {}
        }
        let mut conn = inner.conn.clone();
        match cluster_topology(&mut conn, inner.settings.timeout).await {
            Ok(topology) => {
                let before = inner.topology();
                let start = lock(&inner.shards).install(topology);
                let after = inner.topology();
                if !Arc::ptr_eq(&before, &after) {
                    tracing::info!(
                        masters = after.wake_keys.len(),
                        "redis cluster slot map changed; readers follow it"
                    );
                }
                for shard in start {
                    spawn_reader(&inner, shard);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot re-read the redis cluster slot map"),
        }
        // However many readers fail at once, one refresh per gap.
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(TOPOLOGY_GAP) => {}
        }
    }
}

/// Reads the cluster's slot map and picks, per master, a hash tag that lands in it.
pub(super) async fn cluster_topology(
    conn: &mut Conn,
    timeout: Duration,
) -> BackplaneResult<Topology> {
    parse_cluster_slots(query(conn, redis::cmd("CLUSTER").arg("SLOTS"), timeout).await?)
}

/// A CLUSTER SLOTS reply → the topology.
fn parse_cluster_slots(slots: Value) -> BackplaneResult<Topology> {
    let Value::Array(ranges) = slots else {
        return Err(storage("unexpected CLUSTER SLOTS reply"));
    };
    let mut masters: Vec<String> = Vec::new();
    let mut shard_of_slot = vec![0u16; HASH_SLOTS as usize];
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(Value::Array(master))) =
            (as_u64(parts.first()), as_u64(parts.get(1)), parts.get(2))
        else {
            continue;
        };
        let addr = format!(
            "{}:{}",
            as_string(master.first()).unwrap_or_default(),
            as_u64(master.get(1)).unwrap_or(0)
        );
        let shard = match masters.iter().position(|m| *m == addr) {
            Some(i) => i,
            None => {
                masters.push(addr);
                masters.len() - 1
            }
        };
        for s in start..=end.min(u64::from(HASH_SLOTS) - 1) {
            shard_of_slot[s as usize] = shard as u16;
        }
    }
    if masters.is_empty() {
        return Err(storage("the cluster has no slots assigned"));
    }
    let mut wake_keys = vec![String::new(); masters.len()];
    let mut missing = masters.len();
    let mut i = 0u64;
    while missing > 0 && i < 1_000_000 {
        let tag = format!("w{i}");
        let shard = usize::from(shard_of_slot[usize::from(slot_of(&tag))]);
        if wake_keys[shard].is_empty() {
            wake_keys[shard] = format!("chorus:{{{tag}}}:wake");
            missing -= 1;
        }
        i += 1;
    }
    Ok(Topology {
        shard_of_slot,
        wake_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CLUSTER SLOTS reply: (first slot, last slot, master port) per range.
    fn slots_reply(ranges: &[(u16, u16, u16)]) -> Value {
        Value::Array(
            ranges
                .iter()
                .map(|&(start, end, port)| {
                    Value::Array(vec![
                        Value::Int(i64::from(start)),
                        Value::Int(i64::from(end)),
                        Value::Array(vec![
                            Value::BulkString(b"127.0.0.1".to_vec()),
                            Value::Int(i64::from(port)),
                        ]),
                    ])
                })
                .collect(),
        )
    }

    fn topology(ranges: &[(u16, u16, u16)]) -> Topology {
        parse_cluster_slots(slots_reply(ranges)).expect("slot map")
    }

    const THREE: &[(u16, u16, u16)] = &[(0, 5460, 1), (5461, 10922, 2), (10923, 16383, 3)];

    #[test]
    fn a_reshard_changes_the_map_and_the_same_map_changes_nothing() {
        let mut shards = Shards::new(Topology::single());
        assert_eq!(shards.install(topology(THREE)), vec![0, 1, 2]);
        let before = shards.keep_reader(0).expect("shard 0");
        // The periodic refresh of an unchanged cluster: same map, nobody restarts.
        assert!(shards.install(topology(THREE)).is_empty());
        assert!(Arc::ptr_eq(
            &before,
            &shards.keep_reader(0).expect("shard 0")
        ));
        // Slots 0..=1999 move from the first master to the second: readers see the new map.
        let moved = topology(&[
            (0, 1999, 2),
            (2000, 5460, 1),
            (5461, 10922, 2),
            (10923, 16383, 3),
        ]);
        assert!(shards.install(moved).is_empty());
        let after = shards.keep_reader(0).expect("shard 0");
        assert!(!Arc::ptr_eq(&before, &after));
        let doc = (0..)
            .map(|i| DocId::parse(&format!("d{i}")).expect("doc"))
            .find(|d| slot_of(d.as_str()) < 2000)
            .expect("a document in the moved slots");
        let master_of = |t: &Topology, d: &DocId| t.wake_keys[t.shard(d)].clone();
        let second_master = (0..)
            .map(|i| DocId::parse(&format!("e{i}")).expect("doc"))
            .find(|d| (5461..=10922).contains(&slot_of(d.as_str())))
            .expect("a document of the second master");
        assert_ne!(master_of(&before, &doc), master_of(&before, &second_master));
        assert_eq!(master_of(&after, &doc), master_of(&after, &second_master));
    }

    #[test]
    fn every_node_picks_the_same_wake_key_per_master_whatever_the_reply_order() {
        let a = topology(THREE);
        let b = topology(&[(10923, 16383, 3), (0, 5460, 1), (5461, 10922, 2)]);
        let mut ka = a.wake_keys.clone();
        let mut kb = b.wake_keys.clone();
        ka.sort();
        kb.sort();
        assert_eq!(ka, kb);
        for i in 0..100 {
            let d = DocId::parse(&format!("doc-{i}")).expect("doc");
            assert_eq!(a.wake_keys[a.shard(&d)], b.wake_keys[b.shard(&d)]);
            // The wake key lives on the master it wakes for.
            let key = &a.wake_keys[a.shard(&d)];
            let tag = key
                .strip_prefix("chorus:{")
                .and_then(|k| k.strip_suffix("}:wake"))
                .expect("wake key");
            assert_eq!(
                a.shard_of_slot[usize::from(slot_of(tag))],
                a.shard_of_slot[usize::from(slot_of(d.as_str()))]
            );
        }
    }

    #[test]
    fn readers_follow_the_number_of_masters() {
        let mut shards = Shards::new(Topology::single());
        assert_eq!(shards.install(topology(THREE)), vec![0, 1, 2]);
        // A fourth master gets slots: one more reader, the others keep running.
        let four = &[
            (0, 4000, 1),
            (4001, 5460, 4),
            (5461, 10922, 2),
            (10923, 16383, 3),
        ];
        assert_eq!(shards.install(topology(four)), vec![3]);
        assert!(shards.keep_reader(3).is_some());
        // It is emptied again: the reader of the last shard index stops...
        assert!(shards.install(topology(THREE)).is_empty());
        assert!(shards.keep_reader(3).is_none());
        assert!(shards.keep_reader(2).is_some());
        // ...and if the cluster grows again, that shard gets a reader again.
        assert_eq!(shards.install(topology(four)), vec![3]);
        // A shard whose reader still runs is not started twice.
        assert!(shards.install(topology(four)).is_empty());
    }

    #[test]
    fn a_slot_run_stops_at_the_next_master_or_the_cap() {
        let t = topology(THREE);
        assert_eq!(t.same_master_until(0, 1024), 1024);
        assert_eq!(t.same_master_until(5000, 1024), 5461);
        assert_eq!(t.same_master_until(5461, 100), 5561);
        assert_eq!(t.same_master_until(16000, 1024), HASH_SLOTS);
        assert_eq!(t.same_master_until(HASH_SLOTS, 1024), HASH_SLOTS);
    }

    #[test]
    fn a_slot_map_without_masters_is_refused() {
        assert!(parse_cluster_slots(Value::Array(Vec::new())).is_err());
        assert!(parse_cluster_slots(Value::Nil).is_err());
    }
}
