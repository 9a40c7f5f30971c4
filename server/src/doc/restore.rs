//! Version restore (before the write door): the one update that takes a document's current
//! state back to a stored version's content, computed off the owner task from two encoded
//! states, then appended through [`crate::doc::admit`] like any client's update.
//!
//! How: a document is built from the version, the changes the current state has beyond the
//! version's state vector are applied to it under an `UndoManager` whose scope is every root
//! type, and undone. The undo deletes what was inserted since the version and re-inserts (as
//! new items of a fresh client) what was deleted since; the update that undo transaction
//! produces is the restore. Applied to the current document it yields the version's content for
//! every root type (text with formatting, maps, arrays, XML, nested types), and it is an
//! ordinary CRDT update: edits made concurrently with it merge as with any other.
//!
//! Root types known only by name. A document built from an update has roots of undefined type,
//! and yrs raises no change event for an undefined root, so an `UndoManager` would not see
//! changes made directly in it. Each root is therefore given a type before the changes are
//! applied: a sequence where the current state has sequence content, a map otherwise. The type
//! only steers which event yrs builds; roots are encoded by name alone, and undo works on items
//! whatever their parent's type, so the choice never changes the update.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use yrs::undo::Options as UndoOptions;
use yrs::updates::decoder::Decode;
use yrs::{ClientID, Doc, Options, Out, ReadTxn, Transact, UndoManager, Update};

/// Why no restore update could be computed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the {0} state does not decode: {1}")]
    Decode(&'static str, String),
    #[error("the {0} state does not apply: {1}")]
    Apply(&'static str, String),
    #[error("computing the restore panicked inside yrs")]
    Panicked,
}

/// The origin of the transaction that carries the changes since the version; only it is undone.
const SINCE_VERSION: &str = "chorus-restore-since-version";

/// The update that makes a document whose state is `current` equal in content to `version`,
/// or `None` when nothing changed since the version (no update is needed).
pub fn restore_update(version: &[u8], current: &[u8]) -> Result<Option<Vec<u8>>, RestoreError> {
    catch_unwind(AssertUnwindSafe(|| compute(version, current)))
        .unwrap_or(Err(RestoreError::Panicked))
}

fn decode(which: &'static str, bytes: &[u8]) -> Result<Update, RestoreError> {
    Update::decode_v1(bytes).map_err(|e| RestoreError::Decode(which, e.to_string()))
}

fn compute(version: &[u8], current: &[u8]) -> Result<Option<Vec<u8>>, RestoreError> {
    let now = Doc::new();
    now.transact_mut()
        .apply_update(decode("current", current)?)
        .map_err(|e| RestoreError::Apply("current", e.to_string()))?;
    let now_sv = now.transact().state_vector();
    // The restore's inserts come from a client id the document has never seen.
    let client_id = loop {
        let id = ClientID::random();
        if now_sv.get(&id) == 0 {
            break id;
        }
    };
    let then = Doc::with_options(Options {
        client_id,
        // The undo re-inserts deleted content: it must still be there to copy.
        skip_gc: true,
        ..Options::default()
    });
    then.transact_mut()
        .apply_update(decode("version", version)?)
        .map_err(|e| RestoreError::Apply("version", e.to_string()))?;

    let mut undo: UndoManager = UndoManager::with_options(UndoOptions {
        // One capture: everything applied below is one stack item.
        capture_timeout_millis: u64::MAX / 2,
        ..UndoOptions::default()
    });
    undo.include_origin(SINCE_VERSION);
    for (name, kind) in root_kinds(&now) {
        match kind {
            RootKind::Sequence => undo.expand_scope(&then, &then.get_or_insert_array(name)),
            RootKind::Map => undo.expand_scope(&then, &then.get_or_insert_map(name)),
        }
    }

    let since = {
        let then_sv = then.transact().state_vector();
        now.transact().encode_state_as_update_v1(&then_sv)
    };
    then.transact_mut_with(SINCE_VERSION)
        .apply_update(decode("current", &since)?)
        .map_err(|e| RestoreError::Apply("current", e.to_string()))?;

    let produced: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = produced.clone();
    then.observe_update_v1("chorus-restore", move |_, e| {
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e.update.clone());
    })
    .map_err(|e| RestoreError::Apply("undo", e.to_string()))?;
    let changed = undo.undo_blocking();
    let _ = then.unobserve_update_v1("chorus-restore");
    drop(undo);
    if !changed {
        return Ok(None);
    }
    let produced = std::mem::take(&mut *produced.lock().unwrap_or_else(|p| p.into_inner()));
    let update = match produced.len() {
        0 => return Ok(None),
        1 => produced.into_iter().next().unwrap_or_default(),
        _ => yrs::merge_updates_v1(produced.iter().map(Vec::as_slice))
            .map_err(|e| RestoreError::Decode("undo", e.to_string()))?,
    };
    Ok(Some(update))
}

enum RootKind {
    Sequence,
    Map,
}

/// Every root of `doc` (a superset of the version's roots: a document's items only grow), with
/// the kind of content it holds (see the module doc for why a kind is needed at all).
fn root_kinds(doc: &Doc) -> Vec<(String, RootKind)> {
    let txn = doc.transact();
    txn.root_refs()
        .map(|(name, out)| {
            let kind = match &out {
                Out::YMap(_) => RootKind::Map,
                Out::UndefinedRef(b) if b.len() == 0 => RootKind::Map,
                _ => RootKind::Sequence,
            };
            (name.to_string(), kind)
        })
        .collect()
}

#[cfg(test)]
#[path = "restore_tests.rs"]
mod tests;
