//! Native unit tests of the sans-IO client session, driven with scripted server frames (no socket, no clock).

use chorus_client::{CloseDecision, Event, Session, SessionConfig, Status, TextOp};
use chorus_protocol::{ClientFrame, ErrorCode, Position, ServerFrame, StreamId};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, OffsetKind, Options, ReadTxn, StateVector, Text, Transact, Update};

fn pos(epoch: u64, ms: u64, seq: u64) -> Position {
    Position::new(epoch, StreamId::new(ms, seq))
}

fn session() -> Session {
    Session::new(SessionConfig {
        min_delay_ms: 100,
        max_delay_ms: 2_000,
    })
}

fn sent(s: &mut Session) -> Vec<ClientFrame> {
    std::iter::from_fn(|| s.poll_transmit())
        .map(|b| ClientFrame::decode(&b).expect("client frame"))
        .collect()
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn frame(f: ServerFrame) -> Vec<u8> {
    f.encode().expect("encode")
}

/// A peer's document producing real v1 updates.
fn peer_update(text: &str) -> Vec<u8> {
    let doc = Doc::with_options(Options {
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    let t = doc.get_or_insert_text("text");
    let mut txn = doc.transact_mut();
    t.insert(&mut txn, 0, text);
    txn.encode_update_v1()
}

fn synced(s: &mut Session, doc: &str, update: Vec<u8>, position: Position, replay: bool) {
    s.received(&frame(ServerFrame::Synced {
        doc: doc.into(),
        update,
        position,
        replay,
    }));
}

#[test]
fn subscribes_on_open_and_reports_synced() {
    let mut s = session();
    s.open("room").expect("open");
    s.connecting();
    assert!(
        sent(&mut s).is_empty(),
        "nothing is written before the socket opens"
    );
    s.opened();
    let frames = sent(&mut s);
    assert!(matches!(
        &frames[..],
        [ClientFrame::Subscribe { doc, position: None, state_vector: Some(_) }] if doc == "room"
    ));
    assert_eq!(s.status(), Some(&Status::Connected));
    synced(&mut s, "room", peer_update("hello"), pos(1, 10, 0), false);
    assert_eq!(s.status(), Some(&Status::Synced));
    assert_eq!(s.doc("room").expect("doc").text(), "hello");
    let ev = events(&mut s);
    assert!(ev.contains(&Event::Synced {
        doc: "room".into(),
        replay: false
    }));
    assert!(ev.contains(&Event::TextChanged {
        doc: "room".into(),
        ops: vec![TextOp::Insert {
            insert: "hello".into()
        }]
    }));
}

#[test]
fn resumes_from_the_last_position_after_a_reconnect() {
    let mut s = session();
    s.open("a").expect("open");
    s.open("b").expect("open");
    s.connecting();
    s.opened();
    sent(&mut s);
    synced(&mut s, "a", peer_update("x"), pos(7, 100, 0), false);
    synced(&mut s, "b", Vec::from([0, 0]), pos(7, 50, 0), false);
    s.received(&frame(ServerFrame::Update {
        doc: "a".into(),
        update: peer_update("y"),
        position: pos(7, 120, 3),
    }));
    let decision = s.closed(1006, 0.5, false);
    assert!(matches!(decision, CloseDecision::Reconnect { .. }));
    s.connecting();
    s.opened();
    let frames = sent(&mut s);
    let positions: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Subscribe { doc, position, .. } => Some((doc.as_str(), *position)),
            _ => None,
        })
        .collect();
    assert_eq!(
        positions,
        [("a", Some(pos(7, 120, 3))), ("b", Some(pos(7, 50, 0)))]
    );
}

#[test]
fn positions_only_move_forward_within_an_epoch() {
    let mut s = session();
    s.open("d").expect("open");
    s.connecting();
    s.opened();
    synced(&mut s, "d", Vec::from([0, 0]), pos(1, 100, 5), false);
    let at = |s: &Session| s.doc("d").expect("doc").persist_position();
    for (p, expect) in [
        (pos(1, 100, 4), pos(1, 100, 5)), // older: ignored
        (pos(1, 100, 6), pos(1, 100, 6)), // newer: taken
        (pos(2, 500, 0), pos(1, 100, 6)), // another epoch outside `synced`: ignored
    ] {
        s.received(&frame(ServerFrame::Ack {
            doc: "d".into(),
            seq: None,
            position: p,
        }));
        assert_eq!(at(&s), Some(expect));
    }
    // `synced` is authoritative: it may change the epoch.
    synced(&mut s, "d", Vec::from([0, 0]), pos(2, 1, 0), false);
    assert_eq!(at(&s), Some(pos(2, 1, 0)));
}

#[test]
fn unacknowledged_updates_are_resent_after_reconnect_and_acked_ones_are_not() {
    let mut s = session();
    s.open("d").expect("open");
    // Typed while offline: queued, nothing written.
    s.insert("d", 0, "ab").expect("insert");
    assert!(sent(&mut s).is_empty());
    s.connecting();
    s.opened();
    let frames = sent(&mut s);
    assert!(matches!(&frames[0], ClientFrame::Subscribe { .. }));
    assert!(matches!(
        &frames[1],
        ClientFrame::Update { seq: Some(1), .. }
    ));
    synced(&mut s, "d", Vec::from([0, 0]), pos(1, 1, 0), true);
    s.insert("d", 2, "c").expect("insert");
    s.insert("d", 3, "d").expect("insert");
    let live = sent(&mut s);
    assert_eq!(live.len(), 2, "edits go out at once while connected");
    // Seq 1 and 3 are acked; the socket drops before seq 2's ack.
    for seq in [1, 3] {
        s.received(&frame(ServerFrame::Ack {
            doc: "d".into(),
            seq: Some(seq),
            position: pos(1, 2, seq),
        }));
    }
    s.closed(1006, 0.1, false);
    s.connecting();
    s.opened();
    let frames = sent(&mut s);
    let resent: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            ClientFrame::Update { seq, update, .. } => Some((*seq, update.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].0, Some(2));
    // The resent bytes are the original update: applying all three to a fresh replica gives
    // the text, and applying the resent one twice changes nothing (CRDT idempotence).
    let replica = Doc::new();
    let t = replica.get_or_insert_text("text");
    {
        let mut txn = replica.transact_mut();
        for f in live.iter().chain(frames.iter()).chain(frames.iter()) {
            if let ClientFrame::Update { update, .. } = f {
                txn.apply_update(Update::decode_v1(update).expect("decode"))
                    .expect("apply");
            }
        }
    }
    let s0 = s.doc("d").expect("doc").encode_state();
    replica
        .transact_mut()
        .apply_update(Update::decode_v1(&s0).expect("decode"))
        .expect("apply");
    assert_eq!(t.get_string(&replica.transact()), "abcd");
}

#[test]
fn remote_changes_become_deltas_and_local_ones_do_not() {
    let mut s = session();
    s.open("d").expect("open");
    s.connecting();
    s.opened();
    synced(&mut s, "d", peer_update("world"), pos(1, 1, 0), false);
    events(&mut s);
    s.insert("d", 0, "hello ").expect("insert");
    assert!(
        !events(&mut s)
            .iter()
            .any(|e| matches!(e, Event::TextChanged { .. })),
        "the caller knows what it typed"
    );
    // A peer appends "!" at the end, on top of the current state.
    let peer = Doc::with_options(Options {
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    let pt = peer.get_or_insert_text("text");
    let state = s.doc("d").expect("doc").encode_state();
    peer.transact_mut()
        .apply_update(Update::decode_v1(&state).expect("decode"))
        .expect("apply");
    let sv = peer.transact().state_vector();
    pt.insert(&mut peer.transact_mut(), 11, "!");
    let update = peer.transact().encode_state_as_update_v1(&sv);
    s.received(&frame(ServerFrame::Update {
        doc: "d".into(),
        update,
        position: pos(1, 2, 0),
    }));
    let changed: Vec<_> = events(&mut s)
        .into_iter()
        .filter_map(|e| match e {
            Event::TextChanged { ops, .. } => Some(ops),
            _ => None,
        })
        .collect();
    assert_eq!(
        changed,
        [vec![
            TextOp::Retain { retain: 11 },
            TextOp::Insert { insert: "!".into() }
        ]]
    );
    assert_eq!(s.doc("d").expect("doc").text(), "hello world!");
    // Indexes are UTF-16 code units, as in JavaScript.
    s.insert("d", 0, "😀").expect("insert");
    assert_eq!(s.doc("d").expect("doc").text_len(), 14);
}

#[test]
fn text_events_can_be_turned_off_for_documents_mirrored_elsewhere() {
    let mut s = session();
    s.open("d").expect("open");
    s.set_text_events("d", false).expect("open doc");
    s.connecting();
    s.opened();
    synced(&mut s, "d", peer_update("mirrored"), pos(1, 1, 0), false);
    let ev = events(&mut s);
    assert!(
        !ev.iter().any(|e| matches!(e, Event::TextChanged { .. })),
        "no delta is built when nobody reads it"
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::RemoteUpdate { .. })),
        "raw updates still flow"
    );
    assert_eq!(s.doc("d").expect("doc").text(), "mirrored");
    s.set_text_events("d", true).expect("open doc");
    s.received(&frame(ServerFrame::Update {
        doc: "d".into(),
        update: peer_update("x"),
        position: pos(1, 2, 0),
    }));
    assert!(
        events(&mut s)
            .iter()
            .any(|e| matches!(e, Event::TextChanged { .. }))
    );
    assert!(s.set_text_events("missing", true).is_err());
}

#[test]
fn refused_updates_are_dropped_unless_retrying_can_help() {
    let mut s = session();
    s.open("d").expect("open");
    s.connecting();
    s.opened();
    s.insert("d", 0, "a").expect("insert");
    s.insert("d", 1, "b").expect("insert");
    for (seq, code) in [(1, ErrorCode::TooLarge), (2, ErrorCode::AppendFailed)] {
        s.received(&frame(ServerFrame::Error {
            code,
            message: "no".into(),
            doc: Some("d".into()),
            seq: Some(seq),
        }));
    }
    let pending: Vec<u64> = s.doc("d").expect("doc").pending_seqs();
    assert_eq!(pending, [2]);
    assert!(
        events(&mut s)
            .iter()
            .any(|e| matches!(e, Event::Error { code, .. } if code == "too_large"))
    );
}

#[test]
fn close_codes_decide_between_backoff_and_stopping() {
    let mut s = session();
    s.open("d").expect("open");
    for code in [1001, 1006, 1011, 4000, 4001, 4099] {
        s.connecting();
        match s.closed(code, 0.999, false) {
            CloseDecision::Reconnect { in_ms } => assert!(in_ms < 2_000, "{code}: {in_ms}"),
            CloseDecision::Stop => panic!("{code} should reconnect"),
        }
    }
    assert!(matches!(
        s.status(),
        Some(Status::Reconnecting { attempt: 6, .. })
    ));
    for code in [1003, 1008, 1009, 4100] {
        s.connecting();
        assert_eq!(s.closed(code, 0.5, false), CloseDecision::Stop, "{code}");
        assert!(matches!(s.status(), Some(Status::Offline { .. })));
    }
    // With a token provider, a credentials close is worth another try.
    s.connecting();
    assert!(matches!(
        s.closed(4100, 0.5, true),
        CloseDecision::Reconnect { .. }
    ));
    // Closed by the application: never reconnect.
    s.shutdown();
    assert_eq!(s.closed(1000, 0.5, false), CloseDecision::Stop);
}

#[test]
fn backoff_grows_while_failing_and_resets_once_synced() {
    let mut s = session();
    s.open("d").expect("open");
    let mut windows = Vec::new();
    for _ in 0..6 {
        s.connecting();
        // random just below 1 gives (almost) the whole window.
        if let CloseDecision::Reconnect { in_ms } = s.closed(1006, 0.999_999, false) {
            windows.push(in_ms);
        }
    }
    assert_eq!(windows, [99, 199, 399, 799, 1599, 1999]);
    s.connecting();
    s.opened();
    synced(&mut s, "d", Vec::from([0, 0]), pos(1, 1, 0), false);
    s.connecting();
    assert_eq!(
        s.closed(1006, 0.999_999, false),
        CloseDecision::Reconnect { in_ms: 99 }
    );
}

#[test]
fn a_non_replay_answer_to_a_resume_uploads_our_state() {
    let mut s = session();
    s.open("d").expect("open");
    s.connecting();
    s.opened();
    synced(&mut s, "d", peer_update("kept"), pos(1, 1, 0), false);
    // A first sync without a previous position uploads nothing.
    assert!(
        !sent(&mut s)
            .iter()
            .any(|f| matches!(f, ClientFrame::Update { .. }))
    );
    s.closed(1006, 0.0, false);
    s.connecting();
    s.opened();
    sent(&mut s);
    // The server lost its log (new epoch): it answers with an empty diff, replay false.
    synced(&mut s, "d", Vec::from([0, 0]), pos(2, 1, 0), false);
    let uploads: Vec<_> = sent(&mut s)
        .into_iter()
        .filter_map(|f| match f {
            ClientFrame::Update { update, .. } => Some(update),
            _ => None,
        })
        .collect();
    assert_eq!(uploads.len(), 1);
    let fresh = Doc::new();
    let t = fresh.get_or_insert_text("text");
    fresh
        .transact_mut()
        .apply_update(Update::decode_v1(&uploads[0]).expect("decode"))
        .expect("apply");
    assert_eq!(t.get_string(&fresh.transact()), "kept");
}

#[test]
fn presence_is_announced_forgotten_on_close_and_reannounced() {
    let mut s = session();
    s.open("d").expect("open");
    s.set_presence("d", Some(r#"{"name":"ann"}"#)).expect("set");
    assert!(sent(&mut s).is_empty(), "offline: kept for the next socket");
    s.connecting();
    s.opened();
    let frames = sent(&mut s);
    assert!(matches!(frames.last(), Some(ClientFrame::Awareness { .. })));
    // A peer shows up.
    let peer = {
        let mut p = chorus_client::Presence::new(4242);
        p.set_local(Some(r#"{"name":"bob"}"#))
    };
    s.received(&frame(ServerFrame::Awareness {
        doc: "d".into(),
        update: peer,
    }));
    let states = s.doc("d").expect("doc").presence_states();
    assert_eq!(states.len(), 2);
    assert_eq!(states[&4242].as_ref(), r#"{"name":"bob"}"#);
    events(&mut s);
    s.closed(1006, 0.0, false);
    assert!(events(&mut s).iter().any(|e| matches!(
        e,
        Event::Presence { change, .. } if change.removed == [4242]
    )));
    assert_eq!(s.doc("d").expect("doc").presence_states().len(), 1);
}

#[test]
fn persisted_state_resumes_by_position_with_pending_updates() {
    let mut s = session();
    s.open("d").expect("open");
    s.connecting();
    s.opened();
    synced(&mut s, "d", peer_update("base"), pos(3, 9, 1), false);
    s.closed(1006, 0.0, false);
    s.insert("d", 4, "+offline").expect("insert");
    let saved = s.persist("d").expect("persist");

    // "Reload": a new session restores the document.
    let mut t = session();
    t.open_persisted("d", &saved).expect("restore");
    assert_eq!(t.doc("d").expect("doc").text(), "base+offline");
    t.connecting();
    t.opened();
    let frames = sent(&mut t);
    assert!(matches!(
        &frames[0],
        ClientFrame::Subscribe { position: Some(p), .. } if *p == pos(3, 9, 1)
    ));
    assert!(matches!(
        &frames[1],
        ClientFrame::Update { seq: Some(1), .. }
    ));
    t.insert("d", 0, ">").expect("insert");
    assert!(matches!(
        sent(&mut t).last(),
        Some(ClientFrame::Update { seq: Some(2), .. })
    ));
    assert!(t.open_persisted("e", "not base64!").is_err());
    let _ = StateVector::default().encode_v1();
}

#[test]
fn an_expiry_warning_surfaces_and_a_fresh_token_goes_out_on_the_open_socket() {
    let mut s = session();
    s.open("room").expect("open");
    s.connecting();
    s.opened();
    let _ = sent(&mut s);
    let _ = events(&mut s);
    s.received(&frame(ServerFrame::AuthExpiring {
        expires_at: 1_900_000_000,
    }));
    assert!(events(&mut s).contains(&Event::TokenExpiring {
        expires_at: 1_900_000_000
    }));
    s.refresh_token("fresh.jwt.token");
    assert_eq!(
        sent(&mut s),
        vec![ClientFrame::Auth {
            token: "fresh.jwt.token".into()
        }]
    );
}
