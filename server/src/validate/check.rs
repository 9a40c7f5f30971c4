//! Write path edge, the door itself: [`check_update`] (size, scan, trial apply on a scratch
//! document) and the [`Reach`] it hands on with the bytes to the log entry.

use super::deps::Deps;
use super::{Rejected, scan_update};
use bytes::Bytes;
use std::panic::{AssertUnwindSafe, catch_unwind};
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

/// A client update that passed [`check_update`]. The decoded update is not kept: the trial
/// consumed it, and the owner decodes the bytes again when it applies the entry (one decode
/// per apply is what yrs's API allows: `apply_update` takes the update by value).
pub struct Checked {
    /// What it builds on; the caller checks these against the document before appending.
    pub deps: Deps,
    /// What the owner needs of the scan once the entry is in the log; appended beside the
    /// bytes (see [`Reach`]).
    pub reach: Reach,
}

/// Per client, the clock an update's blocks reach: all the owner needs of the scan when it
/// applies the update (the writers' known clocks it publishes for the write door).
///
/// Carried with the log entry so that the owner of a node's own appends does not walk the
/// update a second time. It holds the very bytes it was computed from, and [`Reach::of`]
/// answers only for those (same allocation, same length: `Bytes` never change, and the
/// allocation cannot be reused while this holds it), so a reach can never be read for other
/// bytes; anything else (entries read back from storage or written by another node) is
/// scanned as before.
///
/// Boxed: entries wait in the embedded log's pending set until redb has them, and an
/// `Option<Reach>` in every entry costs a pointer there, not the whole of it.
#[derive(Debug, Clone)]
pub struct Reach(Box<Scanned>);

#[derive(Debug, Clone)]
struct Scanned {
    bytes: Bytes,
    ends: Ends,
}

/// Most updates are one writer's edit: one client, kept inline (no allocation).
#[derive(Debug, Clone)]
enum Ends {
    One((u64, u64)),
    Many(Box<[(u64, u64)]>),
}

impl Reach {
    fn new(scanned: &Bytes, deps: &Deps) -> Reach {
        let ends = match deps.runs.as_slice() {
            [] => Ends::Many(Box::new([])),
            [r] => Ends::One((r.client, r.end)),
            runs => Ends::Many(runs.iter().map(|r| (r.client, r.end)).collect()),
        };
        Reach(Box::new(Scanned {
            bytes: scanned.clone(),
            ends,
        }))
    }

    /// Per client, the clock `update`'s blocks reach, if this reach was computed from exactly
    /// these bytes; `None` for any other bytes.
    pub fn of(&self, update: &Bytes) -> Option<&[(u64, u64)]> {
        let Scanned { bytes, ends } = &*self.0;
        let same = bytes.as_ptr() == update.as_ptr() && bytes.len() == update.len();
        same.then_some(match ends {
            Ends::One(pair) => std::slice::from_ref(pair),
            Ends::Many(all) => all,
        })
    }
}

/// Full check of a client update before it may be appended to the log: size, structure,
/// decode, and a trial on a scratch document.
pub fn check_update(update: &Bytes, max_bytes: usize) -> Result<Checked, Rejected> {
    if update.len() > max_bytes {
        return Err(Rejected::TooLarge(update.len(), max_bytes));
    }
    let deps = scan_update(update)?;
    // The known panics are refused by the scan above and the fuzz targets (server/fuzz) run
    // `trial_apply` without this net, so a new one is found and fixed at its root; the net
    // stays so that a yrs panic nobody has found yet costs one update, not the connection.
    let trial = catch_unwind(AssertUnwindSafe(|| trial_apply(update)));
    match trial {
        Ok(Ok(())) => Ok(Checked {
            reach: Reach::new(update, &deps),
            deps,
        }),
        Ok(Err(e)) => Err(Rejected::Unapplicable(e)),
        Err(_) => Err(Rejected::Unapplicable("the update makes yrs panic".into())),
    }
}

/// Applies a scanned update to an empty document. An update that depends on state not passed
/// in stays pending there, which is fine; what must not happen is a decode error, an apply
/// error or a panic.
///
/// The trial used to re-encode the scratch document and decode that too, to refuse updates
/// after which a document no longer encodes (legacy JSON content: reliability.md §2). The scan
/// refuses that content, and the re-encoding found nothing else: the `apply` and `yjs_message`
/// fuzz targets hold this trial to [`trial_apply_and_reencode`] (3.5M executions of `apply`
/// from the committed corpus and every regression input, and the corpus replay in `cargo
/// test`), as does a test over every truncation and byte flip of real updates. It was a third
/// of the door's cost per keystroke (`bench_validate`).
pub fn trial_apply(update: &[u8]) -> Result<(), String> {
    let doc = Doc::new();
    let mut txn = doc.transact_mut();
    let copy = Update::decode_v1(update).map_err(|e| e.to_string())?;
    txn.apply_update(copy).map_err(|e| e.to_string())
}

/// [`trial_apply`], then the scratch document re-encoded and decoded again: the trial the write
/// door ran before, kept as the oracle the fuzz targets hold [`trial_apply`] to (it must refuse
/// whatever this refuses).
#[doc(hidden)]
pub fn trial_apply_and_reencode(update: &[u8]) -> Result<(), String> {
    let doc = Doc::new();
    let mut txn = doc.transact_mut();
    let copy = Update::decode_v1(update).map_err(|e| e.to_string())?;
    txn.apply_update(copy).map_err(|e| e.to_string())?;
    let encoded = txn.encode_state_as_update_v1(&StateVector::default());
    Update::decode_v1(&encoded).map_err(|e| format!("does not re-encode: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::testdata::*;
    use crate::validate::{decode_awareness, decode_state_vector};

    #[test]
    fn real_updates_pass_the_scan_and_the_check() {
        for u in sample_updates() {
            scan_update(&u).expect("scan");
            check(&u, 1 << 20).expect("check");
        }
        scan_update(Update::EMPTY_V1).expect("empty update");
    }

    #[test]
    fn a_reach_answers_only_for_the_bytes_it_was_scanned_from() {
        let trace = two_writer_trace();
        let merged = yrs::merge_updates_v1(trace.iter().map(Vec::as_slice)).expect("merges");
        for u in trace.iter().chain([&merged]) {
            let bytes = Bytes::copy_from_slice(u);
            let checked = check_update(&bytes, 1 << 20).expect("valid");
            let ends: Vec<(u64, u64)> = checked.deps.ends().collect();
            assert_eq!(checked.reach.of(&bytes), Some(ends.as_slice()));
            assert_eq!(checked.reach.of(&bytes.clone()), Some(ends.as_slice()));
            // Equal content elsewhere, or a part of the same allocation, is other bytes.
            assert_eq!(checked.reach.of(&Bytes::copy_from_slice(u)), None);
            assert_eq!(checked.reach.of(&bytes.slice(..bytes.len() - 1)), None);
        }
        let multi = check_update(&Bytes::from(merged), 1 << 20).expect("valid");
        assert!(
            multi.deps.ends().count() > 1,
            "both writers' runs are carried"
        );
    }

    #[test]
    fn known_crashers_are_rejected() {
        // reliability.md §2: accepted by yrs, after which the document no longer encodes.
        let poison = [
            0x01, 0x01, 0x01, 0x00, 0x62, 0x08, 0x01, 0x01, 0x01, 0x75, 0x01, 0x7e, 0x00,
        ];
        assert!(check(&poison, 1 << 20).is_err());
        // betteroffice#224: invalid UTF-8 in a string
        let bad_utf8 = [1, 1, 1, 0, 4, 1, 1, b't', 2, 0xff, 0xfe, 0];
        assert!(check(&bad_utf8, 1 << 20).is_err());
        // counts that promise more than the input holds
        assert!(decode_state_vector(&[0x80, 0xe5, 0x9a, 0x77]).is_err());
        assert!(scan_update(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(decode_awareness(&[0x80, 0xe5, 0x9a, 0x77], 1 << 20).is_err());
    }

    #[test]
    fn every_truncation_and_byte_flip_of_real_updates_is_handled() {
        for u in sample_updates() {
            for cut in 0..u.len() {
                let _ = check(&u[..cut], 1 << 20);
            }
            for i in 0..u.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut m = u.clone();
                    m[i] ^= flip;
                    let _ = check(&m, 1 << 20);
                }
            }
        }
    }

    #[test]
    fn the_trial_without_reencoding_refuses_what_the_full_trial_refuses() {
        let (mut scanned, mut refused) = (0, 0);
        let mut differ = |u: &[u8]| {
            if scan_update(u).is_err() {
                return;
            }
            scanned += 1;
            let full = catch_unwind(|| trial_apply_and_reencode(u)).unwrap_or(Err("panic".into()));
            let cheap = catch_unwind(|| trial_apply(u)).unwrap_or(Err("panic".into()));
            assert!(full.is_ok() || cheap.is_err(), "{u:?}: {full:?}");
            refused += usize::from(full.is_err());
        };
        for u in sample_updates().iter().chain(&two_writer_trace()) {
            for cut in 0..u.len() {
                differ(&u[..cut]);
            }
            for i in 0..u.len() {
                for flip in 1..=255u8 {
                    let mut m = u.clone();
                    m[i] ^= flip;
                    differ(&m);
                }
            }
        }
        assert!(scanned > 10_000, "{scanned} mutants passed the scan");
        // (Without the scan, the re-encoding is what refuses legacy JSON content: the poison of
        // `known_crashers_are_rejected` applies, then makes encoding panic. The scan refuses it
        // first, so the re-encoding has nothing left to refuse.)
        assert!(
            refused > 0,
            "some mutants reach the trial and are refused there"
        );
    }

    #[test]
    fn size_limit_applies_first() {
        let u = sample_updates().remove(0);
        assert_eq!(check(&u, 3).err(), Some(Rejected::TooLarge(u.len(), 3)));
    }
}
