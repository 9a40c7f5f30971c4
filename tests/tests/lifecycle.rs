//! Documents over time: compaction and restart, eviction when idle, dead connections reaped.

use chorus_tests::native::NativeClient;
use chorus_tests::{DEADLINE, TestServer, eventually, http};
use std::time::Duration;

#[tokio::test]
async fn compaction_snapshots_and_trims_and_a_restart_loads_it_all() {
    let tune = |c: &mut chorus_server::Config| {
        c.compact_entries = 10;
        c.replay_window = Duration::ZERO;
        c.replay_memory_bytes = 64;
    };
    let server = TestServer::start(tune).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("compact").await;
    let early = {
        let s = c.insert("compact", 0, "a").await;
        c.wait_acked(s).await
    };
    let mut last = 0;
    for i in 1..60u32 {
        last = c.insert("compact", i, "b").await;
    }
    let newest = c.wait_acked(last).await;
    let expected = format!("a{}", "b".repeat(59));
    c.close().await;
    let snap = server.data_dir.join("snapshots").join("compact.snap");
    eventually("compaction writes a snapshot", DEADLINE, || async {
        snap.exists().then_some(())
    })
    .await;

    let dir = server.stop_keep_data().await.expect("data dir");
    let server = TestServer::start_in(dir.path(), tune).await;
    let mut back = NativeClient::connect(&server.ws_url()).await;
    back.subscribe_synced("compact").await;
    assert_eq!(
        back.text("compact"),
        expected,
        "snapshot + remaining log rebuild the document"
    );
    assert_eq!(
        back.positions["compact"], newest,
        "same position after restart"
    );

    // A position older than what is retained is not replayed but answered with the state.
    let mut old = NativeClient::connect(&server.ws_url()).await;
    old.subscribe_from("compact", Some(early), None).await;
    let (_, _, replay) = old.wait_synced("compact").await;
    assert!(!replay, "trimmed positions fall back to a state sync");
    assert_eq!(old.text("compact"), expected);
    server.stop().await;
    drop(dir);
}

#[tokio::test]
async fn idle_documents_are_evicted_and_saved() {
    let server = TestServer::start(|c| c.evict_after = Duration::from_millis(200)).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("idle").await;
    let s = c.insert("idle", 0, "keep me").await;
    c.wait_acked(s).await;
    c.close().await;
    eventually("the document is evicted", DEADLINE, || async {
        let h = http::get(server.addr, "/healthz").await.ok()?;
        (h.json()["hot_documents"] == 0).then_some(())
    })
    .await;
    // An owner saves before it unregisters: once the document is no longer hot, it is saved.
    assert!(
        server.data_dir.join("snapshots").join("idle.snap").exists(),
        "saved on eviction"
    );
    let mut again = NativeClient::connect(&server.ws_url()).await;
    again.subscribe_synced("idle").await;
    assert_eq!(again.text("idle"), "keep me");
}

#[tokio::test]
async fn a_silent_peer_is_closed_and_released() {
    let server = TestServer::start(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.ping_timeout = Duration::from_millis(200);
        c.evict_after = Duration::from_millis(100);
    })
    .await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("silent").await;
    let h = http::get(server.addr, "/healthz").await.expect("GET");
    assert_eq!(h.json()["connections"], 1);
    // Stop reading: pings go unanswered.
    let _held = c.into_silent();
    eventually(
        "the silent connection is closed and its document released",
        DEADLINE,
        || async {
            let h = http::get(server.addr, "/healthz").await.ok()?;
            let j = h.json();
            (j["connections"] == 0 && j["hot_documents"] == 0).then_some(())
        },
    )
    .await;
}

/// A large document's cold load: joins that want the whole document are answered with the
/// snapshot's bytes while yrs integrates it; a join that needs the document (a resume
/// position) waits for the integration; afterwards everything works as usual.
#[tokio::test]
async fn a_large_snapshot_answers_whole_document_joins_while_it_integrates() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, ReadTxn, Text, Transact};

    let server = TestServer::start(|_| {}).await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("big").await;
    // 3 MB of text: well above the size from which a snapshot is answered before it is
    // integrated, and big enough that the integration takes a while.
    let chunk = "abcdefghij".repeat(10_000);
    let mut last = 0;
    for i in 0..30u32 {
        last = writer.insert("big", i * 100_000, &chunk).await;
    }
    let acked = writer.wait_acked(last).await;
    let expected = writer.text("big");
    // An edit in the middle, built here and sent after the restart: it builds on the
    // snapshot's content.
    let edit = {
        let d = writer.doc("big");
        let before = d.transact().state_vector();
        d.get_or_insert_text("t")
            .insert(&mut d.transact_mut(), 1_500_000, "#");
        d.transact().encode_state_as_update_v1(&before)
    };
    writer.close().await;
    let data = server.stop_keep_data().await.expect("data dir");
    let metric = |body: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix("chorus_answered_while_loading_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };

    // No waiting for dependencies: an update that builds on the snapshot must be appended
    // even while the snapshot is still integrating.
    let server = TestServer::start_in(data.path(), |c| c.missing_deps_wait = Duration::ZERO).await;
    let before = metric(&String::from_utf8_lossy(
        &http::get(server.addr, "/metrics")
            .await
            .expect("metrics")
            .body,
    ));
    // Back to back, while the document loads: a native join for everything (it starts the
    // load, so it is always answered from the snapshot), a resume from the last acknowledged
    // position (which needs the document), and a y-websocket client's sync step 1.
    let mut whole = NativeClient::connect(&server.ws_url()).await;
    whole.subscribe("big").await;
    // Straight after the join, while the snapshot integrates: the edit must be appended, not
    // refused for missing dependencies (the wait for them is 0 here).
    let seq = whole.send_update("big", edit).await;
    let mut resumed = NativeClient::connect(&server.ws_url()).await;
    resumed.subscribe_from("big", Some(acked), None).await;
    let (mut yws, _) = tokio_tungstenite::connect_async(format!("{}/big", server.yjs_base()))
        .await
        .expect("y-websocket connect");
    yws.send(Message::Binary(vec![0, 0, 1, 0].into()))
        .await
        .expect("step 1");

    let (_, position, replay) = whole.wait_synced("big").await;
    assert_eq!(position, acked);
    assert!(!replay);
    assert_eq!(whole.text("big"), expected);
    let answer = whole
        .wait_for(|f| {
            matches!(f, chorus_protocol::ServerFrame::Ack { seq: Some(s), .. } if *s == seq)
                || matches!(f, chorus_protocol::ServerFrame::Error { .. })
        })
        .await;
    assert!(
        matches!(answer, chorus_protocol::ServerFrame::Ack { .. }),
        "an edit on the snapshot's content is appended: {answer:?}"
    );
    let (update, position, replay) = resumed.wait_synced("big").await;
    assert_eq!(position, acked);
    assert!(replay, "a resume at the head is an (empty) replay");
    assert_eq!(
        yrs::Update::decode_v1(&update)
            .expect("decode")
            .state_vector(),
        yrs::StateVector::default(),
        "nothing after the position"
    );

    // y-websocket: step 2 with the whole document, and the server's own step 1.
    let (mut step2, mut step1) = (None, None);
    while step2.is_none() || step1.is_none() {
        let msg = tokio::time::timeout(chorus_tests::DEADLINE, yws.next())
            .await
            .expect("y-websocket answer in time")
            .expect("open")
            .expect("message");
        let Message::Binary(b) = msg else { continue };
        match b.get(..2) {
            Some([0, 1]) => step2 = Some(b.to_vec()),
            Some([0, 0]) => step1 = Some(b.to_vec()),
            _ => {}
        }
    }
    let doc = yrs::Doc::new();
    let step2 = step2.expect("step 2");
    let update = {
        let mut d = yrs::encoding::read::Cursor::new(&step2[2..]);
        yrs::encoding::read::Read::read_buf(&mut d)
            .expect("step 2 payload")
            .to_vec()
    };
    doc.transact_mut()
        .apply_update(yrs::Update::decode_v1(&update).expect("decode"))
        .expect("apply");
    // The y-websocket join may come before or after the edit above.
    let with_edit = format!("{}#{}", &expected[..1_500_000], &expected[1_500_000..]);
    let text = doc.get_or_insert_text("t").get_string(&doc.transact());
    assert!(
        text == expected || text == with_edit,
        "y-websocket step 2 is the document"
    );
    let step1 = step1.expect("step 1");
    let sv = {
        let mut d = yrs::encoding::read::Cursor::new(&step1[2..]);
        let raw = yrs::encoding::read::Read::read_buf(&mut d).expect("step 1 payload");
        yrs::StateVector::decode_v1(raw).expect("state vector")
    };
    // Our step 1 carries the document's state vector (at most one edit behind step 2).
    let have = doc.transact().state_vector();
    assert!(!sv.is_empty(), "step 1 carries the document's state vector");
    assert!(
        sv.iter().all(|(c, k)| have.get(c) >= *k),
        "step 1 claims nothing the document lacks"
    );

    // Answered from the snapshot: the native join at least (the y-websocket one too, if it
    // came in before the integration finished).
    let after = metric(&String::from_utf8_lossy(
        &http::get(server.addr, "/metrics")
            .await
            .expect("metrics")
            .body,
    ));
    assert!(
        after - before >= 1.0,
        "joins were answered while loading ({before} → {after})"
    );

    // The integrated document takes writes and fans them out as usual.
    let seq = whole.insert("big", 0, "!").await;
    whole.wait_acked(seq).await;
    let got = resumed
        .wait_for(|f| matches!(f, chorus_protocol::ServerFrame::Update { .. }))
        .await;
    let chorus_protocol::ServerFrame::Update { position, .. } = got else {
        unreachable!()
    };
    assert!(
        position.id > acked.id,
        "the new write, after the resume position"
    );
    server.stop().await;
}
