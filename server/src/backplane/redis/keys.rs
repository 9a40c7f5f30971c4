//! Redis backplane, key names (data-flow steps 4–5): the layout in the module doc, and back.

use chorus_protocol::DocId;

pub(super) const HASH_SLOTS: u16 = 16384;

pub(super) fn log_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:log")
}
pub(super) fn meta_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:meta")
}
pub(super) fn aw_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:aw")
}
pub(super) fn lock_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:lock")
}
pub(super) fn hook_cursors_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:hooks")
}
pub(super) fn hook_lease_key(doc: &DocId) -> String {
    format!("chorus:{{{doc}}}:hooklease")
}
/// Set of documents with undelivered webhooks (standalone Redis only: one key for all).
pub(super) const HOOK_MARKS_KEY: &str = "chorus:hooks:undelivered";
pub(super) fn node_key(node: u64) -> String {
    format!("chorus:node:{node:016x}")
}

/// The Redis Cluster hash slot of a hash tag.
pub(super) fn slot_of(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % HASH_SLOTS
}

pub(super) const REVOCATIONS_KEY: &str = "chorus:revocations";

pub(super) fn ctl_key(node: u64) -> String {
    format!("chorus:ctl:{node:016x}")
}

#[derive(Clone, Copy)]
pub(super) enum Kind {
    Log,
    Awareness,
}

/// `chorus:{DOC}:log` / `chorus:{DOC}:aw` → (doc, kind).
pub(super) fn parse_key(key: &str) -> Option<(DocId, Kind)> {
    let rest = key.strip_prefix("chorus:{")?;
    let (doc, suffix) = rest.rsplit_once("}:")?;
    let kind = match suffix {
        "log" => Kind::Log,
        "aw" => Kind::Awareness,
        _ => return None,
    };
    Some((DocId::parse(doc).ok()?, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_doc_as_hash_tag_and_parse_back() {
        let doc = DocId::parse("a:b@c").expect("doc");
        assert_eq!(log_key(&doc), "chorus:{a:b@c}:log");
        assert!(matches!(parse_key(&log_key(&doc)), Some((d, Kind::Log)) if d == doc));
        assert!(matches!(parse_key(&aw_key(&doc)), Some((d, Kind::Awareness)) if d == doc));
        // Same slot for every key of a document.
        assert_eq!(slot_of("a:b@c"), slot_of("a:b@c"));
    }
}
