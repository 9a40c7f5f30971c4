//! Fuzz target bodies (server/fuzz): everything a client can send, driven from raw bytes. They
//! live here so that `cargo test` replays the committed corpus through them on every run; the
//! libFuzzer binaries in server/fuzz are thin wrappers.
#![doc(hidden)]

use crate::connection::yjs::{Incoming, parse_message};
use crate::validate;
use chorus_protocol::ClientFrame;
use std::sync::OnceLock;
use yrs::sync::Awareness;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Array, Doc, GetString, Map, ReadTxn, StateVector, Text, Transact, Update};

/// `native_frame`: every `/v1/ws` frame is decoded by `ClientFrame::decode` first.
pub fn native_frame(data: &[u8]) {
    if let Ok(frame) = ClientFrame::decode(data) {
        // Whatever decodes is a frame we could have sent ourselves: it re-encodes to an
        // equal frame.
        let bytes = frame.encode().expect("a decoded frame encodes");
        let again = ClientFrame::decode(&bytes).expect("a re-encoded frame decodes");
        assert_eq!(frame, again);
    }
}

/// `yjs_message`: a `/y/{doc}` message is parsed, and an update it carries goes through the
/// scan and the trial apply without the `catch_unwind` net the server keeps around the trial.
pub fn yjs_message(data: &[u8]) {
    match parse_message(data, 1 << 20) {
        Ok(Incoming::Update(update)) => {
            if validate::scan_update(update).is_ok() {
                let trial = validate::trial_apply(update);
                // The same differential as `apply`, over this target's inputs too.
                let full = validate::trial_apply_and_reencode(update);
                assert!(
                    full.is_ok() || trial.is_err(),
                    "only the re-encoding refused this update: {full:?}"
                );
            }
        }
        Ok(Incoming::Awareness(update)) => {
            let mut awareness = Awareness::new(Doc::new());
            if let Ok(Some(summary)) = awareness.apply_update_summary(update) {
                let changed = awareness
                    .update_with_clients(summary.all_changes())
                    .expect("applied states encode");
                let _ = changed.encode_v1();
            }
        }
        Ok(Incoming::SyncStep1(sv)) => {
            let _ = sv.encode_v1();
        }
        Ok(Incoming::QueryAwareness | Incoming::Auth) | Err(_) => {}
    }
}

/// `apply`: the whole write path on a live document. First byte 0: the rest is a client
/// update; 1: an awareness update.
pub fn apply(data: &[u8]) {
    match data.split_first() {
        Some((0, update)) => apply_update(update),
        Some((1, awareness)) => apply_awareness(awareness),
        _ => {}
    }
}

/// Gives each of two replicas what the other has (a full two-way sync).
pub fn exchange(a: &Doc, b: &Doc) {
    let ua = a
        .transact()
        .encode_state_as_update_v1(&b.transact().state_vector());
    let ub = b
        .transact()
        .encode_state_as_update_v1(&a.transact().state_vector());
    b.transact_mut()
        .apply_update(Update::decode_v1(&ua).expect("decodes"))
        .expect("applies");
    a.transact_mut()
        .apply_update(Update::decode_v1(&ub).expect("decodes"))
        .expect("applies");
}

/// A document two writers edited (text with deletions, a map, an array): the live state the
/// fuzzed update lands on.
pub fn seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let a = Doc::with_client_id(1);
        let b = Doc::with_client_id(2);
        for round in 0..4u32 {
            for (i, doc) in [&a, &b].into_iter().enumerate() {
                let text = doc.get_or_insert_text("t");
                let map = doc.get_or_insert_map("m");
                let arr = doc.get_or_insert_array("a");
                let mut txn = doc.transact_mut();
                let len = text.len(&txn);
                text.insert(&mut txn, if i == 0 { 0 } else { len }, "héllo");
                if round % 2 == 1 {
                    text.remove_range(&mut txn, 1, 2);
                }
                map.insert(&mut txn, format!("k{round}"), f64::from(round));
                arr.push_back(&mut txn, format!("v{round}{i}"));
            }
            exchange(&a, &b);
        }
        a.transact()
            .encode_state_as_update_v1(&StateVector::default())
    })
}

pub fn live_doc() -> Doc {
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(Update::decode_v1(seed()).expect("seed decodes"))
        .expect("seed applies");
    doc
}

fn apply_update(update: &[u8]) {
    let Ok(deps) = validate::scan_update(update) else {
        return;
    };
    let trial = validate::trial_apply(update);
    // Differential: the write door's trial (no re-encoding) refuses whatever the trial it
    // replaced refused. (That the document still encodes is checked below, on a live one.)
    let full = validate::trial_apply_and_reencode(update);
    assert!(
        full.is_ok() || trial.is_err(),
        "only the re-encoding refused this update: {full:?}"
    );
    if trial.is_err() {
        return;
    }
    let doc = live_doc();
    let sv = doc.transact().state_vector();
    if !deps.met_by(|c| u64::from(sv.get(&yrs::ClientID::new(c)))) {
        return; // refused on the write path (missing_dependencies)
    }
    let mut txn = doc.transact_mut();
    let Ok(decoded) = Update::decode_v1(update) else {
        return;
    };
    if txn.apply_update(decoded).is_err() {
        return;
    }
    // The dependency check is exact: what it lets through integrates fully, so the live
    // document never carries a pending set.
    assert!(
        !txn.has_missing_updates(),
        "met dependencies left the update pending"
    );
    let state = txn.encode_state_as_update_v1(&StateVector::default());
    let diff = txn.encode_state_as_update_v1(&sv);
    drop(txn);
    // Snapshot round trip: the stored state loads into an equal document.
    let reloaded = Doc::new();
    reloaded
        .transact_mut()
        .apply_update(Update::decode_v1(&state).expect("a snapshot decodes"))
        .expect("a snapshot applies");
    assert_eq!(
        reloaded.transact().state_vector(),
        doc.transact().state_vector()
    );
    let _ = Update::decode_v1(&diff).expect("a diff decodes");
    let text = doc.get_or_insert_text("t");
    let _ = text.get_string(&doc.transact());
}

fn apply_awareness(raw: &[u8]) {
    let Ok(update) = validate::decode_awareness(raw, 1 << 20) else {
        return;
    };
    let mut awareness = Awareness::new(live_doc());
    awareness.set_local_state_raw(r#"{"cursor":{"anchor":1,"head":3}}"#);
    if let Ok(Some(summary)) = awareness.apply_update_summary(update) {
        let changed = awareness
            .update_with_clients(summary.all_changes())
            .expect("applied states encode");
        let _ = changed.encode_v1();
    }
    let _ = awareness.update().expect("all states encode").encode_v1();
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays every committed corpus input (seeds and the inputs of crashes found and fixed)
    /// through its target: what libFuzzer once found stays found.
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("corpus directory") {
            let path = entry.expect("corpus entry").path();
            run(&std::fs::read(&path).expect("corpus file"));
            n += 1;
        }
        n
    }

    #[test]
    fn committed_corpus_replays_cleanly() {
        assert!(replay("native_frame", super::native_frame) > 0);
        assert!(replay("yjs_message", super::yjs_message) > 0);
        assert!(replay("apply", super::apply) > 0);
    }
}
