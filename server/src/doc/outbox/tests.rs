//! The outbox's tests: merging, the budget, answers, awareness, direct writes.

use super::queue::ACK_COST;
use super::*;
use crate::doc::wire::testing::{TEST, parse};
use crate::doc::wire::{Parts, Wire, one};
use chorus_protocol::StreamId;
use std::sync::atomic::Ordering;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{ReadTxn, Text, Transact};

fn outbox(budget: usize) -> Outbox {
    Outbox::new(
        1,
        &TEST,
        OutboxLimits {
            budget,
            awareness_interval: Duration::from_millis(100),
        },
        Arc::new(OutboxStats::default()),
    )
}

fn updates(n: usize, size: usize) -> Vec<Bytes> {
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    (0..n)
        .map(|i| {
            let before = doc.transact().state_vector();
            text.insert(
                &mut doc.transact_mut(),
                0,
                &format!("{i}{}", "x".repeat(size)),
            );
            Bytes::from(doc.transact().encode_state_as_update_v1(&before))
        })
        .collect()
}

fn pos(seq: u64) -> Position {
    Position::new(1, StreamId::new(1, seq))
}

#[test]
fn a_connection_that_keeps_up_gets_the_shared_frames_as_they_are() {
    let o = outbox(1 << 20);
    let doc = DocId::parse("d").expect("id");
    let u = updates(1, 10).remove(0);
    let frame = TEST.update(&doc, &u, pos(1));
    o.push_update(&doc, frame.clone(), u, pos(1), true);
    let d = o.drain();
    assert_eq!(
        d.frames,
        vec![frame],
        "the very bytes built once for every recipient"
    );
    assert_eq!(o.pending_bytes(), 0);
}

#[test]
fn a_held_writer_is_woken_by_a_close_but_not_by_updates() {
    use futures_util::FutureExt;
    let o = outbox(1 << 20);
    let doc = DocId::parse("d").expect("id");
    let push = |seq| {
        let u = updates(1, 10).remove(0);
        o.push_update(&doc, TEST.update(&doc, &u, pos(seq)), u, pos(seq), true);
    };
    push(1);
    assert!(
        o.ready().now_or_never().is_some(),
        "a push wakes the writer"
    );
    assert_eq!(o.drain().frames.len(), 1);

    assert!(o.hold(), "the first hold registers for the tick");
    assert!(!o.hold(), "a writer is registered once per tick");
    push(2);
    assert!(
        o.ready().now_or_never().is_none(),
        "held: the update waits for the flush tick"
    );
    o.release();
    assert!(o.ready().now_or_never().is_some(), "the tick wakes it");
    assert!(!o.is_held());
    assert_eq!(o.drain().frames.len(), 1, "the held update goes out");

    assert!(o.hold());
    o.release();
    assert!(
        o.ready().now_or_never().is_none(),
        "a tick with nothing gathered wakes nobody"
    );
    push(3);
    assert!(
        o.ready().now_or_never().is_some(),
        "the next push goes at once"
    );
    assert_eq!(o.drain().frames.len(), 1);

    assert!(o.hold());
    o.request_close(CloseCode::GoingAway);
    assert!(o.ready().now_or_never().is_some(), "a close goes at once");
    assert!(o.urgent());
}

#[test]
fn a_connection_that_fell_behind_gets_one_merged_update_at_the_last_position() {
    let o = outbox(1 << 20);
    let doc = DocId::parse("d").expect("id");
    let us = updates(20, 10);
    for (i, u) in us.iter().enumerate() {
        let p = pos(i as u64 + 1);
        o.push_update(&doc, TEST.update(&doc, u, p), u.clone(), p, true);
    }
    o.push_own(&doc, Some(7), pos(21));
    assert!(o.pending_bytes() > 0);
    let d = o.drain();
    assert_eq!(d.frames.len(), 2, "one merged update, then the ack");
    let (header, update) = parse(&d.frames[0]);
    assert_eq!(
        header,
        format!("update {}", pos(20)),
        "encoded by the outbox's wire"
    );
    let merged = yrs::merge_updates_v1(us.iter().map(|u| u.as_ref())).expect("merge");
    assert_eq!(update, merged);
    assert_eq!(parse(&d.frames[1]).0, format!("ack Some(7) {}", pos(21)));
}

#[test]
fn over_budget_pending_updates_are_dropped_for_a_catch_up_from_the_last_sent_position() {
    let o = outbox(16 * 1024);
    let doc = DocId::parse("d").expect("id");
    let us = updates(40, 1024);
    let first = &us[0];
    o.push_update(
        &doc,
        TEST.update(&doc, first, pos(1)),
        first.clone(),
        pos(1),
        true,
    );
    let _ = o.drain(); // the socket took position 1
    for (i, u) in us.iter().enumerate().skip(1) {
        let p = pos(i as u64 + 1);
        o.push_update(&doc, TEST.update(&doc, u, p), u.clone(), p, true);
        assert!(o.pending_bytes() <= 16 * 1024, "never above budget");
    }
    o.push_own(&doc, Some(9), pos(41));
    assert_eq!(o.stats.sheds.load(Ordering::Relaxed), 1);
    // Without a handle attached nobody can be asked for the catch-up; attach-less drains
    // still must not send anything stale.
    let d = o.drain();
    assert!(d.frames.is_empty(), "dropped updates are not sent");
    // The catch-up arrives: the owed ack follows it at the catch-up's position.
    o.push_synced(&doc, one(Bytes::from_static(b"synced")), pos(41));
    let d = o.drain();
    assert_eq!(d.frames.len(), 2);
    assert_eq!(d.frames[0], Bytes::from_static(b"synced"));
}

fn push_updates(o: &Outbox, doc: &DocId, us: &[Bytes], first_seq: u64) {
    for (i, u) in us.iter().enumerate() {
        let p = pos(first_seq + i as u64);
        o.push_update(doc, TEST.update(doc, u, p), u.clone(), p, true);
    }
}

#[test]
fn a_newer_sync_answer_replaces_the_waiting_one_and_every_update_before_it() {
    let o = outbox(1 << 20);
    let doc = DocId::parse("d").expect("id");
    push_updates(&o, &doc, &updates(3, 10), 1);
    o.push_own(&doc, Some(4), pos(4));
    o.push_synced(&doc, one(Bytes::from(vec![1u8; 1000])), pos(4));
    push_updates(&o, &doc, &updates(2, 10), 5);
    o.push_synced(&doc, one(Bytes::from(vec![2u8; 1000])), pos(6));
    // One answer and the ack owed for the connection's own entry, at the answer's position.
    assert_eq!(o.pending_bytes(), 1000 + ACK_COST);
    assert_eq!(o.stats.replaced_answers.load(Ordering::Relaxed), 1);
    let d = o.drain();
    assert_eq!(d.frames.len(), 2, "{:?}", d.frames.len());
    assert_eq!(d.frames[0], Bytes::from(vec![2u8; 1000]));
    assert_eq!(parse(&d.frames[1]).0, format!("ack Some(4) {}", pos(6)));
    assert_eq!(o.pending_bytes(), 0);
}

#[test]
fn an_answer_in_pieces_goes_out_whole_in_order_and_counts_every_piece() {
    let o = outbox(1 << 20);
    let doc = DocId::parse("d").expect("id");
    o.push_own(&doc, Some(4), pos(4));
    let pieces: Vec<Bytes> = (1..=3u8).map(|i| Bytes::from(vec![i; 100])).collect();
    o.push_synced(&doc, Parts::from(pieces.clone()), pos(5));
    assert_eq!(o.pending_bytes(), 300 + ACK_COST);
    let d = o.drain();
    assert_eq!(d.frames.len(), 4);
    assert_eq!(d.frames[..3], pieces[..]);
    assert_eq!(
        parse(&d.frames[3]).0,
        format!("ack Some(4) {}", pos(5)),
        "the ack follows the last piece, at the answer's position"
    );
    assert_eq!(o.pending_bytes(), 0);
}

#[test]
fn a_thousand_sync_requests_cost_one_answer() {
    let o = outbox(16 * 1024);
    let doc = DocId::parse("d").expect("id");
    let answer = Bytes::from(vec![7u8; 100 * 1024]);
    for i in 0..1000 {
        o.push_synced(&doc, one(answer.clone()), pos(i));
        assert!(
            o.pending_bytes() <= answer.len(),
            "one answer waits at most"
        );
    }
    assert!(
        o.over_budget(),
        "an answer larger than the budget stops reading"
    );
    let d = o.drain();
    assert_eq!(d.frames, vec![answer]);
    assert!(!o.over_budget());
}

#[test]
fn the_reader_waits_for_room_until_a_drain_brings_the_outbox_under_budget() {
    use futures_util::FutureExt;
    let o = Arc::new(outbox(1024));
    let doc = DocId::parse("d").expect("id");
    o.push_synced(&doc, one(Bytes::from(vec![0u8; 4096])), pos(1));
    let room = o.clone();
    let mut waiting = Box::pin(async move { room.room().await });
    assert!(
        waiting.as_mut().now_or_never().is_none(),
        "over budget: no room"
    );
    let _ = o.drain();
    assert!(waiting.now_or_never().is_some(), "the drain made room");
}

#[test]
fn over_budget_updates_go_but_a_waiting_answer_stays_and_the_catch_up_starts_after_it() {
    let o = outbox(8 * 1024);
    let doc = DocId::parse("d").expect("id");
    let (handle, _commands) = DocHandle::for_tests(&doc);
    o.attach(&doc, handle);
    let answer = Bytes::from(vec![3u8; 6 * 1024]);
    o.push_synced(&doc, one(answer.clone()), pos(10));
    push_updates(&o, &doc, &updates(10, 512), 11);
    assert_eq!(o.stats.sheds.load(Ordering::Relaxed), 1);
    let d = o.drain();
    assert_eq!(
        d.frames,
        vec![answer],
        "the answer is never dropped for the budget"
    );
    assert_eq!(d.resync.len(), 1);
    assert_eq!(
        d.resync[0].1,
        Some(pos(10)),
        "the catch-up follows what the socket got"
    );
}

#[test]
fn error_frames_and_awareness_count_toward_the_budget() {
    let o = outbox(4 * 1024);
    let doc = DocId::parse("d").expect("id");
    let (handle, _commands) = DocHandle::for_tests(&doc);
    o.attach(&doc, handle);
    assert!(o.push_control(Bytes::from(vec![0u8; 100])));
    assert_eq!(o.pending_bytes(), 100);
    // Many clients' presence, each state large: past the budget it is dropped and a
    // snapshot of it is owed instead.
    for id in 0..40u64 {
        let mut aw = yrs::sync::Awareness::new(yrs::Doc::with_client_id(id + 1));
        aw.set_local_state_raw(format!("{{\"pad\":\"{}\"}}", "x".repeat(200)));
        let raw = aw.update().expect("update").encode_v1();
        o.push_awareness(
            &doc,
            TEST.awareness(&doc, &raw).expect("frame"),
            Bytes::from(raw),
        );
        assert!(
            o.pending_bytes() <= 4 * 1024 + 1024,
            "{}",
            o.pending_bytes()
        );
    }
    let d = o.drain();
    assert_eq!(d.awareness.len(), 1, "an awareness snapshot is owed");
    assert_eq!(o.pending_bytes(), 0);
}

#[test]
fn awareness_is_rate_capped_and_newest_state_wins() {
    let o = outbox(1 << 20);
    let doc = DocId::parse("d").expect("id");
    let mut aw = yrs::sync::Awareness::new(yrs::Doc::with_client_id(5));
    let mut push = |n: u32| {
        aw.set_local_state_raw(format!("{{\"n\":{n}}}"));
        let raw = aw.update().expect("update").encode_v1();
        o.push_awareness(
            &doc,
            TEST.awareness(&doc, &raw).expect("frame"),
            Bytes::from(raw),
        );
    };
    push(1);
    assert_eq!(o.drain().frames.len(), 1);
    for n in 2..50 {
        push(n);
    }
    let held = o.drain();
    assert!(
        held.frames.is_empty(),
        "within the interval nothing more is sent"
    );
    assert!(held.wake_at.is_some());
    std::thread::sleep(Duration::from_millis(120));
    let d = o.drain();
    assert_eq!(d.frames.len(), 1, "one frame for everything that waited");
    let (header, update) = parse(&d.frames[0]);
    assert_eq!(header, "awareness");
    let u = AwarenessUpdate::decode_v1(&update).expect("decode");
    assert!(
        u.clients.values().all(|e| e.json.contains("49")),
        "newest state wins"
    );
}

/// A socket that takes at most `room` bytes (framing nothing: payloads count as is).
#[derive(Default)]
struct FakeSocket {
    room: Mutex<usize>,
    written: Mutex<Vec<u8>>,
}

impl FakeSocket {
    fn take(&self, bytes: &Bytes) -> Sent {
        let mut room = self.room.lock().expect("test lock");
        if *room == 0 {
            return Sent::Blocked;
        }
        let n = bytes.len().min(*room);
        *room -= n;
        self.written
            .lock()
            .expect("test lock")
            .extend_from_slice(&bytes[..n]);
        if n == bytes.len() {
            Sent::All
        } else {
            Sent::Partial(vec![bytes.slice(n..)])
        }
    }
}

impl DirectSocket for FakeSocket {
    fn try_send(&self, payload: &Bytes) -> Sent {
        self.take(payload)
    }
    fn try_send_raw(&self, raw: &Bytes) -> Sent {
        self.take(raw)
    }
}

fn direct(room: usize) -> (Outbox, Arc<FakeSocket>) {
    let o = outbox(1 << 20);
    let socket = Arc::new(FakeSocket {
        room: Mutex::new(room),
        ..Default::default()
    });
    o.attach_socket(socket.clone());
    (o, socket)
}

fn push_n(o: &Outbox, doc: &DocId, us: &[Bytes], from: u64) -> Vec<bool> {
    us.iter()
        .enumerate()
        .map(|(i, u)| {
            let p = pos(from + i as u64);
            o.push_update(doc, TEST.update(doc, u, p), u.clone(), p, true)
        })
        .collect()
}

#[test]
fn a_socket_that_keeps_up_gets_updates_written_at_once_and_nothing_queued() {
    let (o, socket) = direct(usize::MAX);
    let doc = DocId::parse("d").expect("id");
    let us = updates(3, 10);
    assert_eq!(push_n(&o, &doc, &us, 1), [true, true, true]);
    assert_eq!(o.pending_bytes(), 0);
    let d = o.drain();
    assert!(d.frames.is_empty() && d.raw.is_empty());
    let expected: Vec<u8> = us
        .iter()
        .enumerate()
        .flat_map(|(i, u)| TEST.update(&doc, u, pos(i as u64 + 1)).to_vec())
        .collect();
    assert_eq!(*socket.written.lock().expect("test lock"), expected);
}

#[test]
fn once_something_queues_for_a_document_everything_after_it_queues_until_written() {
    let (o, socket) = direct(0);
    let doc = DocId::parse("d").expect("id");
    let us = updates(3, 10);
    assert_eq!(push_n(&o, &doc, &us[..1], 1), [false], "blocked: queued");
    *socket.room.lock().expect("test lock") = usize::MAX;
    assert_eq!(
        push_n(&o, &doc, &us[1..2], 2),
        [false],
        "the socket has room again, but the queue comes first"
    );
    let d = o.drain();
    assert_eq!(d.frames.len(), 2);
    assert_eq!(
        push_n(&o, &doc, &us[2..], 3),
        [false],
        "the writer is still writing what it took"
    );
    o.finish_write();
    let d = o.drain();
    assert_eq!(d.frames.len(), 1, "position 3 waited behind the write");
    o.finish_write();
    assert_eq!(push_n(&o, &doc, &us[..1], 4), [true]);
}

#[test]
fn a_short_direct_write_leaves_the_rest_of_the_shared_frame_in_front_of_everything() {
    let doc = DocId::parse("d").expect("id");
    let us = updates(2, 100);
    let first = TEST.update(&doc, &us[0], pos(1));
    let (o, socket) = direct(first.len() / 2);
    assert_eq!(push_n(&o, &doc, &us[..1], 1), [true], "written, partly");
    assert_eq!(
        push_n(&o, &doc, &us[1..], 2),
        [false],
        "queued behind the rest"
    );
    assert!(o.pending_bytes() >= first.len() - first.len() / 2);
    let d = o.drain();
    assert_eq!(d.raw.len(), 1);
    assert_eq!(
        d.raw[0],
        first.slice(first.len() / 2..),
        "the rest, not a copy"
    );
    assert_eq!(d.frames.len(), 1);
    assert_eq!(
        socket.written.lock().expect("test lock").len(),
        first.len() / 2
    );
}

#[test]
fn while_the_writer_writes_pings_queue_and_are_taken_from_the_front_only() {
    let (o, _socket) = direct(usize::MAX);
    // The writer is writing what it drained (a long answer, say): raw frames queue.
    o.lock().writing = true;
    let ping = Bytes::from_static(b"ping");
    let other = Bytes::from_static(b"close reply");
    o.push_raw(ping.clone());
    o.push_raw(other.clone());
    o.push_raw(ping.clone());
    let before = o.pending_bytes();
    let taken = o.take_raw_while(|r| r == &ping);
    assert_eq!(taken, std::slice::from_ref(&ping), "only the leading ping");
    assert_eq!(o.pending_bytes(), before - ping.len(), "and its bytes");
    assert_eq!(o.take_raw(), [other, ping], "the rest keeps its order");
}
