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
/// Set of documents with undelivered webhooks on a standalone Redis (one key for all).
pub(super) const HOOK_MARKS_KEY: &str = "chorus:hooks:undelivered";

/// Where a document's "undelivered" mark lives: on a standalone Redis the one set above; on a
/// cluster the set of the document's hash slot (`chorus:{TAG}:undelivered`, TAG a tag of that
/// slot), so that the append and compare-and-clear scripts touch keys of one slot only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MarkSets {
    Global,
    PerSlot,
}

impl MarkSets {
    pub(super) fn key(self, doc: &DocId) -> String {
        match self {
            MarkSets::Global => HOOK_MARKS_KEY.to_owned(),
            MarkSets::PerSlot => slot_marks_key(slot_of(doc.as_str())),
        }
    }
}

/// The mark set of hash slot `slot` (a cluster's; `slot` < [`HASH_SLOTS`], else wrapped).
pub(super) fn slot_marks_key(slot: u16) -> String {
    format!("chorus:{{{}}}:undelivered", slot_tag(slot))
}

/// The hash tag of slot `slot`'s mark set (`slot` < [`HASH_SLOTS`], else wrapped).
pub(super) fn slot_tag(slot: u16) -> u32 {
    slot_tags()[usize::from(slot % HASH_SLOTS)]
}

/// Per hash slot, the smallest decimal number whose slot it is: the first number of each slot
/// among "0", "1", "2", ... (about 200,000 CRC16s once, a few ms; 64 KiB kept).
fn slot_tags() -> &'static [u32] {
    static TAGS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; usize::from(HASH_SLOTS)];
        let mut missing = tags.len();
        // Terminates: CRC16 reaches every slot within the first few hundred thousand
        // numbers (the unit test below walks the same loop).
        let mut n = 0u32;
        while missing > 0 {
            let slot = &mut tags[usize::from(slot_of(&n.to_string()))];
            if *slot == u32::MAX {
                *slot = n;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}
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

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        let tags = slot_tags();
        assert_eq!(tags.len(), usize::from(HASH_SLOTS));
        for (slot, tag) in tags.iter().enumerate() {
            assert_ne!(*tag, u32::MAX, "slot {slot} has no tag");
            assert_eq!(usize::from(slot_of(&tag.to_string())), slot);
        }
        // A document's mark set is in the document's own slot (one-slot scripts).
        for i in 0..1000 {
            let doc = DocId::parse(&format!("doc-{i}")).expect("doc");
            let key = MarkSets::PerSlot.key(&doc);
            let tag = key
                .strip_prefix("chorus:{")
                .and_then(|k| k.strip_suffix("}:undelivered"))
                .expect("mark key");
            assert_eq!(slot_of(tag), slot_of(doc.as_str()));
        }
        assert_eq!(
            MarkSets::Global.key(&DocId::parse("d").expect("doc")),
            HOOK_MARKS_KEY
        );
    }
}
