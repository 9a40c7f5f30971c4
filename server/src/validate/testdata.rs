//! Updates the validation tests share: real ones made by yrs, and crafted ones.

use super::Checked;
use super::Rejected;
use super::check_update;
use super::scan::{HAS_ORIGIN, HAS_PARENT_SUB};
use bytes::Bytes;
use yrs::{Any, Array, Doc, GetString, Map, ReadTxn, StateVector, Text, Transact};

/// [`check_update`] on bytes of any kind.
pub(super) fn check(update: &[u8], max_bytes: usize) -> Result<Checked, Rejected> {
    check_update(&Bytes::copy_from_slice(update), max_bytes)
}

pub(super) fn sample_updates() -> Vec<Vec<u8>> {
    let doc = Doc::with_client_id(7);
    let text = doc.get_or_insert_text("t");
    let map = doc.get_or_insert_map("m");
    let arr = doc.get_or_insert_array("a");
    let mut out = Vec::new();
    let mut sv = StateVector::default();
    for i in 0..5 {
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "héllo ");
        map.insert(
            &mut txn,
            format!("k{i}"),
            Any::from(vec![Any::from(1.5), Any::from("x")]),
        );
        arr.push_back(&mut txn, Any::from(true));
        if i == 3 {
            text.remove_range(&mut txn, 0, 1);
        }
        drop(txn);
        let txn = doc.transact();
        out.push(txn.encode_state_as_update_v1(&sv));
        sv = txn.state_vector();
    }
    assert!(text.get_string(&doc.transact()).contains("llo"));
    out
}

/// Updates of two writers editing concurrently (text, map, array, a nested type, deletions
/// of each other's content), each encoded against what its writer had seen.
pub(super) fn two_writer_trace() -> Vec<Vec<u8>> {
    let a = Doc::with_client_id(1);
    let b = Doc::with_client_id(2);
    let mut out = Vec::new();
    for round in 0..6u32 {
        for (i, doc) in [&a, &b].into_iter().enumerate() {
            let before = doc.transact().state_vector();
            {
                let text = doc.get_or_insert_text("t");
                let map = doc.get_or_insert_map("m");
                let mut txn = doc.transact_mut();
                let len = text.len(&txn);
                // At the start (builds on a right origin) and at the end (a left origin);
                // the emoji counts two clock units.
                let at = if i == 0 { 0 } else { len };
                text.insert(&mut txn, at, if i == 0 { "ab😀" } else { "xé" });
                if round % 2 == 1 && len > 2 {
                    text.remove_range(&mut txn, 0, 2);
                }
                let nested = map.insert(
                    &mut txn,
                    format!("n{round}{i}"),
                    yrs::ArrayPrelim::default(),
                );
                nested.push_back(&mut txn, Any::from(f64::from(round)));
            }
            out.push(doc.transact().encode_state_as_update_v1(&before));
        }
        // Exchange everything so the next round builds on the other writer's content.
        crate::fuzzing::exchange(&a, &b);
    }
    out
}

pub(super) fn var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One character typed by each of `clients` clients (ids 1..=clients), each to the right of
/// the next client's: client i's block has its origin in client i + 1's, and only the last
/// client's hangs from the root. Listed from client 1 up, the worst order for a check that
/// passes over the clients until nothing moves: each pass lets one more client in.
/// `last_origin`: the client the last block's origin is in instead (closing a cycle).
pub(super) fn chained_update(clients: u64, last_origin: Option<u64>) -> Vec<u8> {
    let mut u = Vec::new();
    var(&mut u, clients);
    for c in 1..=clients {
        u.push(1); // one block
        var(&mut u, c);
        u.push(0); // from clock 0
        let origin = if c < clients {
            Some(c + 1)
        } else {
            last_origin
        };
        if let Some(origin) = origin {
            u.push(HAS_ORIGIN | 4);
            var(&mut u, origin);
            u.push(0);
        } else {
            u.extend([4, 1, 1, b't']); // string content in root "t"
        }
        u.extend([1, b'x']);
    }
    u.push(0); // empty delete set
    u
}

/// `clients` clients with one block each in root "t", and deleted ranges of `deleters`
/// clients.
pub(super) fn wide_update(clients: u64, deleters: u64) -> Vec<u8> {
    let mut u = Vec::new();
    var(&mut u, clients);
    for c in 1..=clients {
        u.push(1);
        var(&mut u, c);
        u.extend([0, 4, 1, 1, b't', 1, b'x']);
    }
    var(&mut u, deleters);
    for c in 1..=deleters {
        var(&mut u, c);
        u.extend([1, 0, 1]); // one range: clock 0, length 1
    }
    u
}

pub(super) fn nested_array_update(depth: usize) -> Vec<u8> {
    // one client, one block at clock 0 in root map "m" under key "k", content Any
    let mut u = vec![1, 1, 1, 0];
    u.push(HAS_PARENT_SUB | 8);
    u.extend([1, 1, b'm', 1, b'k']); // parent info: named root "m"; parent sub "k"
    u.push(1); // one Any value
    for _ in 0..depth {
        u.extend([117, 1]);
    }
    u.push(126); // null at the bottom
    u.push(0); // empty delete set
    u
}
