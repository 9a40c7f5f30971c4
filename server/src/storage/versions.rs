//! Versions (beside snapshots in the store): a document's state kept by name or by policy, with
//! metadata that lists without reading any state.
//!
//! Each version is two objects under a folder no document id can name (ids never start with a
//! dot): `.versions/DOC/ID.state` (the snapshot format: position, checksum, state) and
//! `.versions/DOC/ID.json` (its [`VersionMeta`]). The state is written first and the metadata
//! last, and deletion goes the other way: a version exists exactly when its metadata does, so a
//! crash in between leaves at most an unlisted state that the next delete of that id removes.
//! Compaction and snapshot loads never look there.

use super::{SnapshotStore, StoreError};
use chorus_protocol::{DocId, Position};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A version's id: creation time (ms since the epoch, 13 digits) and 64 random bits, so ids
/// sort by age and two nodes never pick the same one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VersionId(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a version id is 13 digits, a dash and 16 lowercase hex digits")]
pub struct BadVersionId;

const ID_MS_DIGITS: usize = 13;
const ID_RANDOM_DIGITS: usize = 16;

/// The time part of the newest id this process made: ids made by one node strictly increase,
/// so versions kept within one millisecond still list in the order they were kept.
static LAST_ID_MS: AtomicU64 = AtomicU64::new(0);

impl VersionId {
    pub fn new(created_ms: u64) -> Self {
        let ms = created_ms % 10u64.pow(ID_MS_DIGITS as u32);
        let prev = LAST_ID_MS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(ms.max(last + 1))
            })
            .unwrap_or(0);
        VersionId(format!(
            "{:0w$}-{:016x}",
            ms.max(prev + 1),
            rand::random::<u64>(),
            w = ID_MS_DIGITS
        ))
    }

    /// Only what [`VersionId::new`] makes: ids become file and object names, so nothing else
    /// (no `/`, no `..`) may pass.
    pub fn parse(s: &str) -> Result<Self, BadVersionId> {
        let (ms, random) = s.split_once('-').ok_or(BadVersionId)?;
        let ok = ms.len() == ID_MS_DIGITS
            && ms.bytes().all(|b| b.is_ascii_digit())
            && random.len() == ID_RANDOM_DIGITS
            && random
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(VersionId(s.to_owned()))
        } else {
            Err(BadVersionId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for VersionId {
    type Error = BadVersionId;
    fn try_from(s: String) -> Result<Self, BadVersionId> {
        VersionId::parse(&s)
    }
}

impl From<VersionId> for String {
    fn from(id: VersionId) -> String {
        id.0
    }
}

/// Why a version exists: named ones are kept until deleted, automatic ones are pruned to the
/// newest `--keep-versions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionKind {
    Auto,
    Named,
}

/// What a listing shows of a version (the `.json` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub id: VersionId,
    /// The log position the state covers.
    #[serde(with = "position_string")]
    pub position: Position,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub name: Option<String>,
    /// Size of the state (one yrs v1 update).
    pub bytes: usize,
    pub kind: VersionKind,
}

mod position_string {
    use chorus_protocol::Position;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Position, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Position, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Most named versions one document may have: they are kept until deleted, and a listing holds
/// every version's metadata, so a writer may not grow them without bound.
pub const MAX_NAMED_PER_DOCUMENT: usize = 1000;

/// Longest version name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadVersionName {
    #[error("a version name is at most {MAX_NAME_BYTES} bytes")]
    TooLong,
    #[error("a version name may not be empty or contain control characters")]
    Unprintable,
}

pub fn check_name(name: &str) -> Result<(), BadVersionName> {
    if name.len() > MAX_NAME_BYTES {
        return Err(BadVersionName::TooLong);
    }
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(BadVersionName::Unprintable);
    }
    Ok(())
}

impl VersionMeta {
    pub fn new(position: Position, name: Option<String>, bytes: usize) -> Self {
        let now = std::time::SystemTime::now();
        let ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let kind = if name.is_some() {
            VersionKind::Named
        } else {
            VersionKind::Auto
        };
        VersionMeta {
            id: VersionId::new(ms),
            position,
            created_at: humantime::format_rfc3339_millis(now).to_string(),
            name,
            bytes,
            kind,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn from_json(bytes: &[u8], doc: &DocId) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes).map_err(|_| StoreError::Corrupt {
            doc: doc.to_string(),
            why: "version metadata does not parse",
        })
    }

    /// Milliseconds since the epoch at creation (from the id).
    pub fn created_ms(&self) -> u64 {
        self.id.0[..ID_MS_DIGITS].parse().unwrap_or(0)
    }
}

/// The folder (under the store's root) of a document's versions.
pub(crate) fn folder(doc: &DocId) -> String {
    format!(".versions/{doc}")
}

/// Deletes the oldest automatic versions of `doc` beyond the newest `keep`; named versions are
/// never touched. Returns how many were deleted.
pub async fn prune_auto(
    store: &dyn SnapshotStore,
    doc: &DocId,
    keep: usize,
) -> Result<usize, StoreError> {
    let mut auto: Vec<VersionMeta> = store
        .list_versions(doc)
        .await?
        .into_iter()
        .filter(|m| m.kind == VersionKind::Auto)
        .collect();
    // Newest first (ids sort by creation time).
    auto.sort_by(|a, b| b.id.cmp(&a.id));
    let mut deleted = 0;
    for old in auto.iter().skip(keep) {
        if store.delete_version(doc, &old.id).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_only_well_formed_ones_parse() {
        let a = VersionId::new(1_700_000_000_000);
        let b = VersionId::new(1_700_000_000_001);
        assert!(a < b);
        assert_eq!(VersionId::parse(a.as_str()), Ok(a.clone()));
        for bad in [
            "",
            "../../etc/passwd",
            "1700000000000-../../../x",
            "1700000000000-ABCDEF0123456789",
            "170000000000-0123456789abcdef",
            "1700000000000-0123456789abcdef/",
            "1700000000000_0123456789abcdef",
        ] {
            assert_eq!(VersionId::parse(bad), Err(BadVersionId), "{bad:?}");
        }
    }

    #[test]
    fn metadata_round_trips_as_json() {
        let meta = VersionMeta::new(
            Position::new(3, chorus_protocol::StreamId::new(12, 4)),
            Some("before the launch".into()),
            42,
        );
        let doc = DocId::parse("d").expect("id");
        assert_eq!(
            VersionMeta::from_json(&meta.to_json(), &doc).expect("parse"),
            meta
        );
        assert_eq!(meta.kind, VersionKind::Named);
        assert!(meta.created_ms() > 1_700_000_000_000);
    }

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(check_name("v1.0 — reviewed").is_ok());
        assert_eq!(check_name(&"x".repeat(201)), Err(BadVersionName::TooLong));
        assert_eq!(check_name("a\nb"), Err(BadVersionName::Unprintable));
        assert_eq!(check_name("  "), Err(BadVersionName::Unprintable));
    }
}
