//! Read side, for the inspector: what a document's encoded state is made of (writers, items,
//! tombstones, deleted ranges), walked with the write path's scanner instead of built.
//!
//! yrs keeps its block store private, so counting items through it would mean decoding the
//! whole document; walking the encoded state with the same bounds-checked reader as the write
//! door costs one pass over the bytes and allocates only the per-client range lists.

use super::Scan;
use super::deps::Deps;
use super::lib0::{Lib0Reader, read_client};
use super::scan::scan_block;
use serde::Serialize;

/// What a document's encoded state (a yrs v1 update holding everything) contains.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Anatomy {
    /// Writer clients in the state vector (every session that ever wrote).
    pub clients: usize,
    /// Structs in the block store: live items, deleted items and garbage-collected runs.
    pub items: u64,
    /// Structs whose whole range is deleted: deleted items kept for their position, and
    /// garbage-collected runs.
    pub tombstones: u64,
    /// Ranges in the delete set, and the clock units they cover.
    pub deleted_ranges: u64,
    pub deleted_length: u64,
}

/// Walks `state` (a yrs v1 update). Fails as the write door would on bytes it cannot read.
pub fn anatomy(state: &[u8]) -> Scan<Anatomy> {
    let mut r = Lib0Reader::new(state);
    let mut scratch = Deps::default();
    let mut out = Anatomy::default();
    // (client, start, end, whether a GC run) per struct, to match against the delete set.
    let mut structs: Vec<(u64, u64, u64, bool)> = Vec::new();
    let clients = r.count(3)?;
    out.clients = clients;
    for _ in 0..clients {
        let blocks = r.count(2)?;
        let client = read_client(&mut r)?;
        let mut clock = r.var_u64()?;
        for _ in 0..blocks {
            let gc = r.clone().u8()? == 0;
            let len = scan_block(&mut r, &mut scratch)?;
            // Only block counts and ranges are wanted, not what blocks refer to.
            scratch.block_refs.clear();
            structs.push((client, clock, clock.saturating_add(len), gc));
            clock = clock.saturating_add(len);
        }
    }
    out.items = structs.len() as u64;
    let mut deleted: Vec<(u64, u64, u64)> = Vec::new();
    let ds_clients = r.count(2)?;
    for _ in 0..ds_clients {
        let client = read_client(&mut r)?;
        let ranges = r.count(2)?;
        for _ in 0..ranges {
            let clock = r.var_u64()?;
            let len = r.var_u64()?;
            deleted.push((client, clock, clock.saturating_add(len)));
            out.deleted_length = out.deleted_length.saturating_add(len);
        }
    }
    out.deleted_ranges = deleted.len() as u64;
    deleted.sort_unstable();
    out.tombstones = structs
        .iter()
        .filter(|&&(client, start, end, gc)| gc || covered(&deleted, client, start, end))
        .count() as u64;
    Ok(out)
}

/// Whether `[start, end)` of `client` lies within one deleted range (yrs splits items at
/// deletion boundaries, so a deleted item is inside one range of the merged delete set).
fn covered(deleted: &[(u64, u64, u64)], client: u64, start: u64, end: u64) -> bool {
    let i = deleted.partition_point(|&(c, s, _)| (c, s) <= (client, start));
    i > 0 && {
        let (c, s, e) = deleted[i - 1];
        c == client && s <= start && end <= e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, Options, ReadTxn, Text, Transact};

    #[test]
    fn counts_writers_items_and_tombstones() {
        // Without GC, deleted items stay as tombstones whose content is dropped.
        let doc = Doc::with_options(Options {
            client_id: yrs::ClientID::new(7),
            skip_gc: true,
            ..Options::default()
        });
        let text = doc.get_or_insert_text("t");
        text.insert(&mut doc.transact_mut(), 0, "hello");
        text.insert(&mut doc.transact_mut(), 5, " world");
        text.remove_range(&mut doc.transact_mut(), 0, 6);
        assert_eq!(text.get_string(&doc.transact()), "world");
        let other = Doc::with_client_id(9);
        let state = doc
            .transact()
            .encode_state_as_update_v1(&yrs::StateVector::default());
        other
            .transact_mut()
            .apply_update(yrs::Update::decode_v1(&state).expect("decodes"))
            .expect("applies");
        let t2 = other.get_or_insert_text("t");
        t2.insert(&mut other.transact_mut(), 5, "!");
        let state = other
            .transact()
            .encode_state_as_update_v1(&yrs::StateVector::default());
        let a = anatomy(&state).expect("walks");
        assert_eq!(a.clients, 2);
        assert_eq!(a.deleted_ranges, 1);
        assert_eq!(a.deleted_length, 6, "'hello '");
        assert!(a.tombstones >= 1, "{a:?}");
        assert!(a.items > a.tombstones, "{a:?}");
    }

    #[test]
    fn refuses_what_the_write_door_refuses() {
        assert!(anatomy(&[0xff, 0xff, 0xff]).is_err());
        let empty = anatomy(&[0, 0]).expect("an empty update");
        assert_eq!(empty, Anatomy::default());
    }
}
