use super::*;
use yrs::types::text::YChange;
use yrs::types::{Attrs, ToJson};
use yrs::{
    Any, Array, ArrayPrelim, GetString, Map, MapPrelim, Text, TextPrelim, WriteTxn,
    XmlElementPrelim, XmlFragment, XmlTextPrelim,
};

fn state(doc: &Doc) -> Vec<u8> {
    doc.transact()
        .encode_state_as_update_v1(&yrs::StateVector::default())
}

fn load(state: &[u8]) -> Doc {
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(Update::decode_v1(state).expect("decode"))
        .expect("apply");
    doc
}

/// Every root's content as a string: text with its formatting (delta), maps and arrays as JSON
/// (nested types included), the XML fragment as XML.
fn content(doc: &Doc) -> String {
    let text = doc.get_or_insert_text("t");
    let (map, array, xml) = (
        doc.get_or_insert_map("m"),
        doc.get_or_insert_array("a"),
        doc.get_or_insert_xml_fragment("x"),
    );
    let txn = doc.transact();
    let delta: Vec<String> = text
        .diff(&txn, YChange::identity)
        .into_iter()
        .map(|d| format!("{}{:?}", d.insert, d.attributes))
        .collect();
    // Through serde_json: its maps are sorted, yrs's are not.
    let json = |any: Any| serde_json::to_string(&serde_json::to_value(any).expect("json"));
    let map = json(map.to_json(&txn)).expect("json");
    let array = json(array.to_json(&txn)).expect("json");
    let xml = xml.get_string(&txn);
    format!("text={delta:?}\nmap={map}\narray={array}\nxml={xml}")
}

fn bold() -> Attrs {
    Attrs::from([("bold".into(), Any::Bool(true))])
}

/// A document of every kind of root, built by a writer that never declared them on the
/// restoring side (the restore sees them by name only).
fn edited_doc() -> Doc {
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let map = doc.get_or_insert_map("m");
    let array = doc.get_or_insert_array("a");
    let xml = doc.get_or_insert_xml_fragment("x");
    let mut txn = doc.transact_mut();
    text.insert(&mut txn, 0, "hello brave world");
    text.format(&mut txn, 0, 5, bold());
    map.insert(&mut txn, "title", "draft");
    map.insert(&mut txn, "gone-later", 1);
    let inner = map.insert(&mut txn, "nested", MapPrelim::default());
    inner.insert(&mut txn, "deep", "value");
    let list = inner.insert(&mut txn, "list", ArrayPrelim::default());
    list.push_back(&mut txn, 1);
    list.push_back(&mut txn, 2);
    array.push_back(&mut txn, "first");
    array.push_back(&mut txn, TextPrelim::new("inner text"));
    let p = xml.push_back(&mut txn, XmlElementPrelim::empty("p"));
    p.push_back(&mut txn, XmlTextPrelim::new("para"));
    drop(txn);
    doc
}

fn edit_more(doc: &Doc) {
    let text = doc.get_or_insert_text("t");
    let map = doc.get_or_insert_map("m");
    let array = doc.get_or_insert_array("a");
    let xml = doc.get_or_insert_xml_fragment("x");
    let later = doc.get_or_insert_text("later");
    let mut txn = doc.transact_mut();
    text.remove_range(&mut txn, 6, 6);
    text.insert(&mut txn, 0, ">> ");
    text.format(
        &mut txn,
        0,
        8,
        Attrs::from([("italic".into(), Any::Bool(true))]),
    );
    text.format(&mut txn, 3, 5, Attrs::from([("bold".into(), Any::Null)]));
    map.remove(&mut txn, "gone-later");
    map.insert(&mut txn, "title", "final");
    map.insert(&mut txn, "added", true);
    if let Some(yrs::Out::YMap(inner)) = map.get(&txn, "nested") {
        inner.remove(&mut txn, "deep");
        if let Some(yrs::Out::YArray(list)) = inner.get(&txn, "list") {
            list.remove(&mut txn, 0);
            list.push_back(&mut txn, 3);
        }
    }
    array.remove(&mut txn, 1);
    array.insert(&mut txn, 0, "zeroth");
    xml.remove_range(&mut txn, 0, 1);
    xml.push_back(&mut txn, XmlElementPrelim::empty("h1"));
    later.insert(&mut txn, 0, "a root born after the version");
}

fn restored(version: &[u8], doc: &Doc) -> Option<Vec<u8>> {
    restore_update(version, &state(doc)).expect("restore computes")
}

#[test]
fn a_restore_brings_every_root_type_back_to_the_versions_content() {
    let doc = edited_doc();
    let version = state(&doc);
    let expected = content(&load(&version));
    edit_more(&doc);
    assert_ne!(content(&doc), expected, "the edits changed something");
    let update = restored(&version, &doc).expect("an update");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&update).expect("decode"))
        .expect("apply");
    assert_eq!(content(&doc), expected);
    let later = doc.get_or_insert_text("later");
    assert_eq!(
        later.get_string(&doc.transact()),
        "",
        "a newer root is emptied"
    );
    // A client holding only the pre-restore state converges the same way.
    let replica = load(&state(&doc));
    assert_eq!(content(&replica), expected);
}

#[test]
fn nothing_changed_since_the_version_needs_no_update() {
    let doc = edited_doc();
    let version = state(&doc);
    assert_eq!(restored(&version, &doc), None);
}

#[test]
fn a_restore_is_undone_by_restoring_a_later_version() {
    let doc = edited_doc();
    let v1 = state(&doc);
    edit_more(&doc);
    let v2 = state(&doc);
    let later = content(&doc);
    let update = restored(&v1, &doc).expect("update");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&update).expect("decode"))
        .expect("apply");
    let back = restored(&v2, &doc).expect("update");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&back).expect("decode"))
        .expect("apply");
    assert_eq!(content(&doc), later);
}

#[test]
fn an_edit_concurrent_with_the_restore_merges_like_any_other() {
    let doc = edited_doc();
    let version = state(&doc);
    edit_more(&doc);
    let base = state(&doc);
    let update = restore_update(&version, &base)
        .expect("computes")
        .expect("update");
    // Another client edits the pre-restore state meanwhile.
    let other = load(&base);
    {
        let text = other.get_or_insert_text("t");
        let mut txn = other.transact_mut();
        text.insert(&mut txn, 0, "X");
    }
    let concurrent = other
        .transact()
        .encode_state_as_update_v1(&load(&base).transact().state_vector());
    let a = load(&base);
    let b = load(&base);
    for (doc, first, second) in [(&a, &update, &concurrent), (&b, &concurrent, &update)] {
        let mut txn = doc.transact_mut();
        txn.apply_update(Update::decode_v1(first).expect("d"))
            .expect("a");
        txn.apply_update(Update::decode_v1(second).expect("d"))
            .expect("a");
    }
    assert_eq!(content(&a), content(&b));
    assert!(content(&a).contains('X'), "the concurrent insert survives");
}

#[test]
fn garbage_states_are_errors_not_panics() {
    assert!(restore_update(b"\xff\xff\xff", &[0, 0]).is_err());
    assert!(restore_update(&[0, 0], b"\x05").is_err());
}

#[test]
fn a_root_created_by_name_only_is_restored_too() {
    // The writer uses a root the restoring side never declared, with content set directly.
    let doc = Doc::new();
    {
        let mut txn = doc.transact_mut();
        let text = txn.get_or_insert_text("plain");
        text.insert(&mut txn, 0, "abc");
    }
    let version = state(&doc);
    {
        let text = doc.get_or_insert_text("plain");
        let mut txn = doc.transact_mut();
        text.remove_range(&mut txn, 0, 1);
        text.insert(&mut txn, 2, "def");
    }
    let update = restored(&version, &doc).expect("update");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&update).expect("decode"))
        .expect("apply");
    let text = doc.get_or_insert_text("plain");
    assert_eq!(text.get_string(&doc.transact()), "abc");
}

/// Figures, not a timed test: what a restore costs on a large document. Run with
/// `cargo test -p chorus-server --release --lib restore_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn restore_cost_on_a_large_document() {
    use rand::{Rng, SeedableRng};
    let doc = Doc::new();
    let text = doc.get_or_insert_text("t");
    let chunk = "lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(18);
    {
        let mut txn = doc.transact_mut();
        while text.len(&txn) < 1 << 20 {
            let len = text.len(&txn);
            text.insert(&mut txn, len, &chunk);
        }
    }
    let version = state(&doc);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // 10 000 edits since the version, each its own transaction: inserts, deletes, formatting.
    for i in 0..10_000u32 {
        let mut txn = doc.transact_mut();
        let len = text.len(&txn);
        let at = rng.random_range(0..len - 20);
        match i % 3 {
            0 => text.insert(&mut txn, at, "edit "),
            1 => text.remove_range(&mut txn, at, 7),
            _ => text.format(&mut txn, at, 9, bold()),
        }
    }
    let current = state(&doc);
    let started = std::time::Instant::now();
    let update = restore_update(&version, &current)
        .expect("computes")
        .expect("an update");
    let took = started.elapsed();
    let applied = std::time::Instant::now();
    doc.transact_mut()
        .apply_update(Update::decode_v1(&update).expect("decode"))
        .expect("apply");
    let apply_took = applied.elapsed();
    assert_eq!(content(&doc), content(&load(&version)));
    println!(
        "restore of a {} byte version ({} byte current state, 10000 edits since): \
         computed in {:.1} ms, update {} bytes, applied in {:.1} ms",
        version.len(),
        current.len(),
        took.as_secs_f64() * 1e3,
        update.len(),
        apply_took.as_secs_f64() * 1e3
    );
}
