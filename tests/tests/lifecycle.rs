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
