//! Read side, for operators: what the inspector reports about one document — the owner's live
//! bookkeeping ([`OwnerFacts`], answered by its task) plus what the encoded state is made of
//! (walked and decoded off the owner, in [`Inspection::build`]).

use super::json::{Kind, Roots};
use crate::validate::{Anatomy, anatomy};
use bytes::Bytes;
use chorus_protocol::Position;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

/// What a document's owner knows about it right now.
#[derive(Debug, Clone)]
pub struct OwnerFacts {
    pub position: Position,
    /// The whole document as one yrs v1 update, at `position`.
    pub state: Bytes,
    /// Log entries applied since the last snapshot this owner saved or loaded, and their bytes.
    pub since_snapshot: (usize, usize),
    /// The newest snapshot this owner knows is stored.
    pub snapshot: Option<Position>,
    /// The last snapshot this owner saved (a compaction or a save on unload): when, and at.
    pub last_compaction: Option<(std::time::SystemTime, Position)>,
    /// Subscribers on this node, by wire name.
    pub subscribers: BTreeMap<&'static str, usize>,
    /// Entries kept in memory for replay without I/O, and their bytes.
    pub replay_memory: (usize, usize),
    /// Entries after `position` were trimmed before this owner applied them; it waits for a
    /// reload from the snapshot (see `actor::recover`).
    pub gap: bool,
    /// It holds blocks whose dependencies never arrived (see `actor::ingest`).
    pub missing_deps: bool,
}

/// The inspector's answer.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub doc: String,
    pub position: String,
    pub epoch: u64,
    /// Whether this node held the document before the request (inspecting loads it, like any
    /// read, and the idle timer unloads it again).
    pub hot: bool,
    pub state_bytes: usize,
    #[serde(flatten)]
    pub anatomy: Anatomy,
    pub roots: Vec<Value>,
    pub log_since_snapshot: Value,
    pub snapshot_position: Option<String>,
    pub last_compaction: Option<Value>,
    pub subscribers: BTreeMap<&'static str, usize>,
    pub replay_memory: Value,
    pub gap: bool,
    pub missing_deps: bool,
}

impl Inspection {
    /// Walks and decodes the state: a full decode, so callers run it off the owner and bound
    /// how many run at once.
    pub fn build(
        doc: String,
        hot: bool,
        facts: OwnerFacts,
        hints: &HashMap<String, Kind>,
    ) -> Result<Inspection, String> {
        let anatomy = anatomy(&facts.state).map_err(|e| format!("state does not walk: {e}"))?;
        let roots = Roots::decode(&facts.state, hints)?
            .roots
            .into_iter()
            .map(|r| json!({"name": r.name, "kind": r.kind.name(), "length": r.len}))
            .collect();
        Ok(Inspection {
            doc,
            position: facts.position.to_string(),
            epoch: facts.position.epoch,
            hot,
            state_bytes: facts.state.len(),
            anatomy,
            roots,
            log_since_snapshot: json!({
                "entries": facts.since_snapshot.0,
                "bytes": facts.since_snapshot.1,
            }),
            snapshot_position: facts.snapshot.map(|p| p.to_string()),
            last_compaction: facts.last_compaction.map(|(at, position)| {
                json!({
                    "at": humantime::format_rfc3339_millis(at).to_string(),
                    "position": position.to_string(),
                })
            }),
            subscribers: facts.subscribers,
            replay_memory: json!({
                "entries": facts.replay_memory.0,
                "bytes": facts.replay_memory.1,
            }),
            gap: facts.gap,
            missing_deps: facts.missing_deps,
        })
    }
}
