//! Writes the committed seed corpus for the fuzz targets: real frames, y-websocket messages and
//! updates that build on the live document. Run from server/fuzz: `cargo run --bin make_corpus`.

use chorus_protocol::{ClientFrame, Position, StreamId};
use chorus_protocol::y_websocket::{
    awareness as awareness_message, sync_step1, sync_step2 as sync_step2_message,
    sync_update as sync_update_message,
};
use std::path::Path;
use yrs::sync::Awareness;
use yrs::updates::encoder::Encode;
use yrs::{Array, Doc, Map, ReadTxn, StateVector, Text, Transact};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// Updates a third writer makes on top of the live document: inserts, a deletion of others'
/// content, map and array edits, a nested type, and an emoji (two clock units).
fn updates_on_live_doc() -> Vec<Vec<u8>> {
    let doc = chorus_server::fuzzing::live_doc();
    let mut out = Vec::new();
    let mut edit = |f: &dyn Fn(&Doc)| {
        let before = doc.transact().state_vector();
        f(&doc);
        out.push(doc.transact().encode_state_as_update_v1(&before));
    };
    edit(&|d| {
        let t = d.get_or_insert_text("t");
        t.insert(&mut d.transact_mut(), 2, "xy😀");
    });
    edit(&|d| {
        let t = d.get_or_insert_text("t");
        t.remove_range(&mut d.transact_mut(), 0, 4);
    });
    edit(&|d| {
        let m = d.get_or_insert_map("m");
        m.insert(&mut d.transact_mut(), "k0", "replaced");
    });
    edit(&|d| {
        let a = d.get_or_insert_array("a");
        let mut txn = d.transact_mut();
        a.insert(&mut txn, 1, true);
        let nested = a.push_back(&mut txn, yrs::MapPrelim::default());
        nested.insert(&mut txn, "deep", vec![1.0, 2.0]);
    });
    out
}

fn main() {
    let updates = updates_on_live_doc();
    let full = chorus_server::fuzzing::seed().to_vec();
    let sv = chorus_server::fuzzing::live_doc()
        .transact()
        .state_vector()
        .encode_v1();

    let mut aw = Awareness::new(Doc::with_client_id(99));
    aw.set_local_state_raw(
        r##"{"user":{"name":"ann","color":"#f00"},"cursor":{"anchor":3,"head":5}}"##,
    );
    let awareness = aw.update().expect("awareness").encode_v1();
    aw.clean_local_state();
    let removal = aw.update().expect("awareness").encode_v1();

    // native frames
    let frames = [
        ClientFrame::Subscribe {
            doc: "notes".into(),
            position: Some(Position::new(1234567, StreamId::new(1_700_000_000_000, 3))),
            state_vector: Some(sv.clone()),
        },
        ClientFrame::Subscribe {
            doc: "a:b@c".into(),
            position: None,
            state_vector: None,
        },
        ClientFrame::Update {
            doc: "notes".into(),
            update: updates[0].clone(),
            seq: Some(7),
        },
        ClientFrame::Awareness {
            doc: "notes".into(),
            update: awareness.clone(),
        },
        ClientFrame::Unsubscribe {
            doc: "notes".into(),
        },
        ClientFrame::Auth {
            token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
        },
    ];
    for (i, f) in frames.iter().enumerate() {
        write(
            "native_frame",
            &format!("frame-{i}"),
            &f.encode().expect("encode"),
        );
    }

    // y-websocket messages
    write(
        "yjs_message",
        "step1",
        &sync_step1(&StateVector::default().encode_v1()),
    );
    write("yjs_message", "step2-full", &sync_step2_message(&full));
    for (i, u) in updates.iter().enumerate() {
        write(
            "yjs_message",
            &format!("update-{i}"),
            &sync_update_message(u),
        );
    }
    write("yjs_message", "awareness", &awareness_message(&awareness));
    write(
        "yjs_message",
        "awareness-removal",
        &awareness_message(&removal),
    );
    write("yjs_message", "query-awareness", &[3]);

    // the live write path: 0 = update, 1 = awareness
    for (i, u) in updates.iter().enumerate() {
        write("apply", &format!("update-{i}"), &[&[0u8][..], u].concat());
    }
    write("apply", "update-full", &[&[0u8][..], &full].concat());
    write("apply", "awareness", &[&[1u8][..], &awareness].concat());
    write(
        "apply",
        "awareness-removal",
        &[&[1u8][..], &removal].concat(),
    );
    println!("seed corpus written under corpus/");
}
