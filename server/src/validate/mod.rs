//! Edge of the write path: every client-supplied update, state vector and awareness update is
//! checked here before yrs decodes it, so nothing that reaches the log can crash a node.
//!
//! Why a pre-scan: yrs 0.28.1 decodes `Any` values recursively with no depth limit (a ~12 KB
//! update of nested arrays overflows the stack, an abort `catch_unwind` cannot catch), and it
//! pre-allocates from attacker-chosen counts (a 4-byte state vector made it reserve ~500 MB).
//! `scan_update` walks the lib0 v1 update format exactly as `Update::decode_v1` does, with an
//! explicit nesting limit and every count checked against the bytes that remain; it also
//! refuses the content after which a document could no longer be encoded (legacy JSON, see
//! ../shared/research/reliability.md §2). Then the update is applied to a scratch document
//! (`trial_apply`), which refuses what yrs cannot decode or apply.
//!
//! What walks an update, per update, on the node whose client sent it: here, one scan and one
//! decode (the trial; it no longer re-encodes the scratch document, see `trial_apply` for the
//! differential fuzzing that showed the re-encoding refused nothing the rest does not); in the
//! owner, one decode to apply it (yrs's `apply_update` consumes the decoded update, so the
//! trial's copy cannot serve twice). The
//! owner also needs the clock each writer's blocks reach; it takes that from the [`Reach`] the
//! check put beside the bytes in the log entry rather than scanning again. Entries without one
//! are scanned by the owner: those read back from storage (a load, a catch-up), and every
//! entry of a Redis log, whose reader hands back new bytes from XREAD. Carrying it across Redis
//! would take a side table keyed by (epoch, id), filled when XADD answers, which races the
//! reader that may deliver the entry first; the scan it would save is ~0.2 µs of the ~1 µs the
//! owner spends applying a keystroke (`bench_validate`).
//!
//! The parts, bottom up: `lib0` (the bounds-checked reader), `scan` (an update or state
//! vector walked as yrs would decode it), `deps` (what an update builds on, and whether a
//! document meets it), `check` (the door: size, scan, trial apply; the reach it carries to
//! the log), `awareness` (presence updates). The limits are here.

mod anatomy;
mod awareness;
mod check;
mod deps;
mod lib0;
mod scan;
mod split;
#[cfg(test)]
mod testdata;

pub use anatomy::{Anatomy, anatomy};
pub use awareness::decode_awareness;
pub use check::{Checked, Reach, check_update, trial_apply, trial_apply_and_reencode};
pub use deps::Deps;
pub use lib0::Lib0Reader;
pub use scan::{decode_state_vector, scan_update};
pub use split::split_update;

/// Deepest nesting of `Any` arrays/maps accepted inside an update. Yjs documents built by
/// editors nest a handful of levels; 64 leaves room for JSON-ish app data while staying far
/// below the ~6,000 levels that overflow a 2 MiB stack.
pub const MAX_ANY_DEPTH: usize = 64;

/// Most yrs clients one update may carry blocks of (and, separately, deleted ranges of).
/// Every Yjs session that edits is one client, so a document accumulates clients over its
/// life and a full-state update (an offline client's first sync, an HTTP import) carries them
/// all: the limit sits far above what real documents reach. It bounds the per-client work and
/// state one message can cost (the dependency check is linear, but each client also grows
/// every node's state vector of the document for good); without it a 2 MiB update could
/// carry ~170k one-block clients.
pub const MAX_UPDATE_CLIENTS: usize = 1 << 16;

/// Highest clock yrs can represent (its clocks are u32).
const MAX_CLOCK: u64 = u32::MAX as u64;

/// Client ids are 53-bit (JavaScript-safe) integers; yrs stores them with the top 11 bits as a
/// tag, so a larger id would alias another (and trips a debug assertion).
const MAX_CLIENT: u64 = (1 << 53) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("{0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("values nested deeper than {MAX_ANY_DEPTH} levels")]
    TooDeep,
    #[error("the document could not take this update: {0}")]
    Unapplicable(String),
    #[error("awareness state is not valid JSON")]
    BadJson,
    /// More clients with blocks, or with deleted ranges, than [`MAX_UPDATE_CLIENTS`].
    #[error("{0} clients in one update is over the limit of {MAX_UPDATE_CLIENTS}")]
    TooManyClients(usize),
}

type Scan<T> = Result<T, Rejected>;
