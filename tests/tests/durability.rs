//! Acknowledged means durable: `kill -9` right after an ack loses nothing.

use chorus_tests::native::NativeClient;
use chorus_tests::{ServerProcess, http};

#[tokio::test]
async fn acknowledged_updates_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::spawn(dir.path(), &[]).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("durable").await;
    let mut last = 0;
    for i in 0..50u32 {
        last = c.insert("durable", i, "x").await;
    }
    let acked = c.wait_acked(last).await;
    // Straight after the ack: no graceful shutdown, no snapshot.
    server.kill9().await;

    let server = ServerProcess::spawn(dir.path(), &[]).await;
    let resp = http::get(server.addr, "/v1/docs/durable")
        .await
        .expect("GET");
    assert_eq!(resp.status, 200);
    let doc = yrs::Doc::new();
    {
        use yrs::Transact;
        use yrs::updates::decoder::Decode;
        doc.transact_mut()
            .apply_update(yrs::Update::decode_v1(&resp.body).expect("decode"))
            .expect("apply");
    }
    let text = {
        use yrs::{GetString, Transact};
        doc.get_or_insert_text("t").get_string(&doc.transact())
    };
    assert_eq!(
        text,
        "x".repeat(50),
        "every acknowledged update is there after kill -9"
    );
    let position: chorus_protocol::Position = resp
        .header("x-chorus-position")
        .expect("position header")
        .parse()
        .expect("position");
    assert_eq!(position, acked, "same epoch and position after the restart");

    // And the client resumes on the restarted node by replay.
    let mut back = NativeClient::connect(&server.ws_url()).await;
    back.subscribe_from("durable", Some(acked), None).await;
    let (_, _, replay) = back.wait_synced("durable").await;
    assert!(
        replay,
        "resume from the acked position is an (empty) replay"
    );
    server.terminate().await;
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::spawn(dir.path(), &["--shutdown-timeout", "5s"]).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("drain").await;
    let s = c.insert("drain", 0, "saved").await;
    c.wait_acked(s).await;
    let status = server.terminate().await;
    assert_eq!(
        c.wait_closed().await,
        Some(1001),
        "clients are told to go away and reconnect"
    );
    assert!(status.success(), "exit status {status:?}");
    // What was acknowledged before the signal is in the snapshot store.
    use chorus_server::storage::SnapshotStore;
    let store = chorus_server::storage::fs::FsSnapshotStore::open(dir.path().join("snapshots"))
        .expect("store");
    let doc = chorus_protocol::DocId::parse("drain").expect("id");
    let snap = store
        .load(&doc)
        .await
        .expect("load")
        .expect("a snapshot was saved on shutdown");
    let saved = yrs::Doc::new();
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Transact};
    saved
        .transact_mut()
        .apply_update(yrs::Update::decode_v1(&snap.state).expect("decode"))
        .expect("apply");
    assert_eq!(
        saved.get_or_insert_text("t").get_string(&saved.transact()),
        "saved"
    );
}

#[tokio::test]
async fn a_damaged_write_ahead_segment_keeps_the_node_from_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Acknowledged entries on disk, then the node dies.
    let server = ServerProcess::spawn(dir.path(), &[]).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("damaged").await;
    let s = c.insert("damaged", 0, "kept").await;
    c.wait_acked(s).await;
    server.kill9().await;
    // A segment whose header was overwritten: whatever it held cannot be read back.
    let segment = dir.path().join("log.redb.wal-9999999999");
    std::fs::write(&segment, [0x5a; 256]).expect("write");

    let out = tokio::time::timeout(
        chorus_tests::DEADLINE,
        tokio::process::Command::new(chorus_tests::chorus_bin())
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", chorus_tests::free_port()))
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the node gives up instead of serving")
    .expect("run chorus");
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&segment.display().to_string()) && stderr.contains("corrupt at byte 0"),
        "the error names the file and the offset: {stderr}"
    );
    assert!(
        segment.exists(),
        "the damaged segment is left for the operator"
    );
}
