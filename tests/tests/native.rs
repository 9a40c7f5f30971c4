//! Native protocol end to end: convergence, positions, acks, resume by position.

use chorus_protocol::{Position, StreamId};
use chorus_tests::native::NativeClient;
use chorus_tests::{DEADLINE, TestServer};
use std::time::Duration;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, Transact, Update};

#[tokio::test]
async fn two_clients_converge_with_positions_and_acks() {
    let server = TestServer::start(|_| {}).await;
    let mut a = NativeClient::connect(&server.ws_url()).await;
    let mut b = NativeClient::connect(&server.ws_url()).await;
    let (_, pa, replay) = a.subscribe_synced("room").await;
    assert!(
        !replay,
        "a first subscribe without a position is a full sync"
    );
    let (_, pb, _) = b.subscribe_synced("room").await;
    assert_eq!(pa, pb, "both start at the same position");

    let s1 = a.insert("room", 0, "hello").await;
    let ack1 = a.wait_acked(s1).await;
    b.wait_text("room", "hello").await;
    assert_eq!(
        b.positions["room"], ack1,
        "the update reaches b at the position a's ack names"
    );

    let s2 = b.insert("room", 5, " world").await;
    let ack2 = b.wait_acked(s2).await;
    a.wait_text("room", "hello world").await;
    assert!(
        ack2.id > ack1.id && ack2.epoch == ack1.epoch,
        "positions increase"
    );

    // Concurrent edits from both sides converge to the same state.
    let (mut last_a, mut last_b) = (0, 0);
    for i in 0..20u32 {
        last_a = a.insert("room", 0, "a").await;
        last_b = b.insert("room", i, "b").await;
    }
    // Acks come in log order, so the last one means every earlier one was sent too.
    a.wait_acked(last_a).await;
    b.wait_acked(last_b).await;
    let expected_len = "hello world".len() + 40;
    let until = tokio::time::Instant::now() + DEADLINE;
    while a.text("room").len() != expected_len || b.text("room") != a.text("room") {
        assert!(
            tokio::time::Instant::now() < until,
            "did not converge: {:?} vs {:?}",
            a.text("room"),
            b.text("room")
        );
        let _ = a.next_event(Duration::from_millis(50)).await;
        let _ = b.next_event(Duration::from_millis(50)).await;
    }
    let sa = a
        .doc("room")
        .transact()
        .encode_state_as_update_v1(&Default::default());
    let sb = b
        .doc("room")
        .transact()
        .encode_state_as_update_v1(&Default::default());
    let server_state = chorus_tests::http::get(server.addr, "/v1/docs/room")
        .await
        .expect("GET");
    let server_doc = yrs::Doc::new();
    server_doc
        .transact_mut()
        .apply_update(Update::decode_v1(&server_state.body).expect("decode"))
        .expect("apply");
    let server_text = {
        use yrs::GetString;
        server_doc
            .get_or_insert_text("t")
            .get_string(&server_doc.transact())
    };
    assert_eq!(a.text("room"), b.text("room"));
    assert_eq!(
        server_text,
        a.text("room"),
        "the server holds the same document"
    );
    assert_eq!(
        Update::decode_v1(&sa).expect("a").state_vector(),
        Update::decode_v1(&sb).expect("b").state_vector(),
        "both clients hold the same state"
    );
    assert_eq!(
        a.regressions + b.regressions,
        0,
        "no position ever went backwards"
    );
    assert_eq!(a.acks.len(), 21);
    assert_eq!(b.acks.len(), 21);
    assert!(
        a.errors.is_empty() && b.errors.is_empty(),
        "{:?} {:?}",
        a.errors,
        b.errors
    );
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_entries() {
    let server = TestServer::start(|_| {}).await;
    let mut reader = NativeClient::connect(&server.ws_url()).await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    reader.subscribe_synced("doc").await;
    writer.subscribe_synced("doc").await;
    let s = writer.insert("doc", 0, "seen ").await;
    writer.wait_acked(s).await;
    reader.wait_text("doc", "seen ").await;
    let resume_at = reader.positions["doc"];
    let writer_client = writer.doc("doc").client_id();
    let clock_at_disconnect = writer.state_vector("doc").get(&writer_client);
    let mut reader_doc_state = reader
        .doc("doc")
        .transact()
        .encode_state_as_update_v1(&Default::default());
    reader.close().await;

    // N updates the reader misses.
    const N: u32 = 25;
    let mut last = None;
    for i in 0..N {
        let s = writer.insert("doc", 5 + i, "m").await;
        last = Some(s);
    }
    let last_ack = writer.wait_acked(last.expect("sent")).await;
    let clock_now = writer.state_vector("doc").get(&writer_client);

    let mut back = NativeClient::connect(&server.ws_url()).await;
    {
        let d = back.doc("doc");
        d.transact_mut()
            .apply_update(Update::decode_v1(&reader_doc_state).expect("decode"))
            .expect("apply");
    }
    back.subscribe_from("doc", Some(resume_at), None).await;
    let (update, position, replay) = back.wait_synced("doc").await;
    assert!(replay, "a position still in the log is answered by replay");
    assert_eq!(
        position, last_ack,
        "the replay brings the client to the newest entry"
    );
    let replayed = Update::decode_v1(&update).expect("replayed update decodes");
    // The replay covers exactly the missed entries: from the writer's clock at disconnect to
    // its clock now, and nothing from before.
    assert_eq!(
        replayed.state_vector_lower().get(&writer_client),
        clock_at_disconnect
    );
    assert_eq!(
        replayed.state_vector().get(&writer_client),
        0,
        "no entry from before the position"
    );
    let upper: u32 = replayed
        .insertions(true)
        .iter()
        .filter(|(c, _)| **c == writer_client)
        .flat_map(|(_, r)| r.iter().map(|r| r.end))
        .max()
        .expect("writer's items");
    assert_eq!(upper, clock_now, "up to the newest missed entry");
    assert_eq!(back.text("doc"), format!("seen {}", "m".repeat(N as usize)));

    // The same position with another epoch is not trusted: full state-vector sync.
    reader_doc_state.clear();
    let mut foreign = NativeClient::connect(&server.ws_url()).await;
    let forged = Position::new(resume_at.epoch ^ 1, resume_at.id);
    foreign.subscribe_from("doc", Some(forged), None).await;
    let (update, position, replay) = foreign.wait_synced("doc").await;
    assert!(!replay, "a foreign epoch gets a state sync, not a replay");
    assert_eq!(position, last_ack);
    assert_eq!(foreign.text("doc"), back.text("doc"));
    assert!(
        Update::decode_v1(&update)
            .expect("decode")
            .state_vector()
            .get(&writer_client)
            == clock_now
    );

    // A position from the future, likewise.
    let mut future = NativeClient::connect(&server.ws_url()).await;
    let ahead = Position::new(last_ack.epoch, StreamId::new(last_ack.id.ms + 1_000_000, 0));
    future.subscribe_from("doc", Some(ahead), None).await;
    let (_, _, replay) = future.wait_synced("doc").await;
    assert!(!replay);
    assert_eq!(future.text("doc"), back.text("doc"));
}

#[tokio::test]
async fn state_vector_subscribe_gets_only_the_difference() {
    let server = TestServer::start(|_| {}).await;
    let mut w = NativeClient::connect(&server.ws_url()).await;
    w.subscribe_synced("sv").await;
    let s = w.insert("sv", 0, "abc").await;
    w.wait_acked(s).await;
    let sv = yrs::updates::encoder::Encode::encode_v1(&w.state_vector("sv"));
    let s = w.insert("sv", 3, "def").await;
    w.wait_acked(s).await;

    let mut r = NativeClient::connect(&server.ws_url()).await;
    r.subscribe_from("sv", None, Some(sv)).await;
    let (update, _, replay) = r.wait_synced("sv").await;
    assert!(!replay);
    let u = Update::decode_v1(&update).expect("decode");
    let client = w.doc("sv").client_id();
    assert_eq!(
        u.state_vector_lower().get(&client),
        3,
        "only what came after the state vector"
    );
}

#[tokio::test]
async fn one_socket_carries_many_documents() {
    let server = TestServer::start(|_| {}).await;
    let mut a = NativeClient::connect(&server.ws_url()).await;
    let mut b = NativeClient::connect(&server.ws_url()).await;
    for d in ["one", "two", "three"] {
        a.subscribe_synced(d).await;
        b.subscribe_synced(d).await;
    }
    for d in ["one", "two", "three"] {
        a.insert(d, 0, d).await;
    }
    for d in ["one", "two", "three"] {
        b.wait_text(d, d).await;
    }
    // After unsubscribing, a document's updates stop arriving on that socket.
    b.send(&chorus_protocol::ClientFrame::Unsubscribe { doc: "two".into() })
        .await;
    let _ = b.drain_for(Duration::from_millis(200)).await;
    a.insert("two", 0, "x").await;
    a.insert("one", 0, "y").await;
    b.wait_text("one", "yone").await;
    let _ = b.drain_for(Duration::from_millis(200)).await;
    assert_eq!(
        b.text("two"),
        "two",
        "no updates for an unsubscribed document"
    );
    assert!(
        !b.acks.iter().any(|(d, _, _)| d == "two"),
        "and no acks either"
    );
}

#[tokio::test]
async fn a_document_larger_than_the_message_limit_still_syncs() {
    // Incoming messages are capped, outgoing `synced` frames are as large as the document.
    let server = TestServer::start(|c| {
        c.max_message_bytes = 64 * 1024;
        c.max_update_bytes = 32 * 1024;
    })
    .await;
    let mut w = NativeClient::connect(&server.ws_url()).await;
    w.subscribe_synced("big").await;
    let chunk = "z".repeat(20 * 1024);
    let mut last = 0;
    for i in 0..15u32 {
        last = w.insert("big", i * chunk.len() as u32, &chunk).await;
    }
    w.wait_acked(last).await;
    let mut r = NativeClient::connect(&server.ws_url()).await;
    let (update, _, _) = r.subscribe_synced("big").await;
    assert!(
        update.len() > 64 * 1024 * 4,
        "the synced frame is {} bytes",
        update.len()
    );
    assert_eq!(r.text("big").len(), 15 * chunk.len());
}

#[tokio::test]
async fn a_replay_larger_than_the_state_it_leads_to_is_replaced_by_the_state() {
    let server = TestServer::start(|_| {}).await;
    let mut w = NativeClient::connect(&server.ws_url()).await;
    w.subscribe_synced("overwrite").await;
    let mut r = NativeClient::connect(&server.ws_url()).await;
    r.subscribe_synced("overwrite").await;
    let position = r.positions["overwrite"];
    r.close().await;
    // 50 overwrites of one 10 KB value: ~500 KB of log entries, a ~10 KB document.
    let mut last = 0;
    for i in 0..50 {
        last = w
            .set_map("overwrite", "v", &format!("{i}:{}", "x".repeat(10 * 1024)))
            .await;
    }
    w.wait_acked(last).await;
    let mut back = NativeClient::connect(&server.ws_url()).await;
    back.subscribe_from("overwrite", Some(position), None).await;
    let (update, _, replay) = back.wait_synced("overwrite").await;
    assert!(!replay, "the smaller state is sent instead of the replay");
    assert!(update.len() < 20 * 1024, "{} bytes", update.len());
    assert_eq!(
        back.map_value("overwrite", "v"),
        w.map_value("overwrite", "v")
    );
}
