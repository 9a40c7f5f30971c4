//! The S3-compatible snapshot store, against moto's S3 server: snapshots load back, an older
//! one never replaces a newer one, and nodes sharing Redis share snapshots through it (a node
//! that loads a document whose log was trimmed gets everything from the stored snapshot).

use bytes::Bytes;
use chorus_protocol::{DocId, Position, StreamId};
use chorus_server::storage::s3::S3SnapshotStore;
use chorus_server::storage::{Snapshot, SnapshotStore};
use chorus_tests::multinode::node_has_all;
use chorus_tests::native::NativeClient;
use chorus_tests::redis::RedisServer;
use chorus_tests::s3::S3Server;
use chorus_tests::{DEADLINE, ServerProcess, eventually};

fn snap(epoch: u64, ms: u64, state: &'static [u8]) -> Snapshot {
    Snapshot {
        position: Position::new(epoch, StreamId::new(ms, 0)),
        state: Bytes::from_static(state),
    }
}

fn store(s3: &S3Server, url: &str) -> S3SnapshotStore {
    let options = s3.options();
    let options: Vec<(&str, &str)> = options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    S3SnapshotStore::from_url_with(url, &options).expect("s3 store")
}

#[tokio::test]
async fn s3_snapshots_load_back_and_never_go_backwards() {
    let s3 = S3Server::start("snaps").await;
    let store = store(&s3, "s3://snaps/unit");
    let doc = DocId::parse("doc-1").expect("id");
    assert_eq!(store.load(&doc).await.expect("load"), None);
    assert!(store.save(&doc, snap(1, 10, b"ten")).await.expect("save"));
    assert!(
        !store
            .save(&doc, snap(1, 5, b"five"))
            .await
            .expect("older is refused")
    );
    assert_eq!(
        store.load(&doc).await.expect("load"),
        Some(snap(1, 10, b"ten"))
    );
    assert!(
        store
            .save(&doc, snap(1, 20, b"twenty"))
            .await
            .expect("save")
    );
    assert_eq!(
        store.load(&doc).await.expect("load"),
        Some(snap(1, 20, b"twenty"))
    );
    // A new epoch (the log was recreated) replaces.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // S3 times have 1 s resolution
    assert!(store.save(&doc, snap(2, 1, b"new")).await.expect("save"));
    assert_eq!(
        store.load(&doc).await.expect("load"),
        Some(snap(2, 1, b"new"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_snapshots_through_s3() {
    let s3 = S3Server::start("chorus").await;
    let redis = RedisServer::start().await;
    let args = [
        "--redis-url",
        &redis.url(),
        "--snapshot-store",
        "s3://chorus/nodes",
        "--compact-entries",
        "10",
        "--replay-window",
        "10s",
    ];
    let d1 = tempfile::tempdir().expect("tempdir");
    let writer_node = ServerProcess::spawn_env(d1.path(), &args, &s3.env()).await;
    let mut c = NativeClient::connect(&writer_node.ws_url()).await;
    c.subscribe_synced("shared").await;
    let mut tokens = Vec::new();
    let mut last = 0;
    let started = tokio::time::Instant::now();
    for i in 0..30u32 {
        if i == 15 {
            // Pacing, not synchronisation: a shared log keeps at least 10 s of entries
            // (`--replay-window` cannot be shorter), so the second half's compactions are
            // the first that may trim the first half.
            c.wait_acked(last).await;
            tokio::time::sleep_until(started + std::time::Duration::from_secs(11)).await;
        }
        let t = format!("<{i}>");
        let len = c.text("shared").len() as u32;
        last = c.insert("shared", len, &t).await;
        tokens.push(t);
    }
    c.wait_acked(last).await;

    // Compaction wrote a snapshot to S3 and trimmed the log behind it.
    let inspect = store(&s3, "s3://chorus/nodes");
    let doc = DocId::parse("shared").expect("id");
    eventually("a snapshot in S3 and a trimmed log", DEADLINE, || async {
        let s = inspect.load(&doc).await.ok()??;
        let xlen: usize = redis
            .cli(&["XLEN", "chorus:{shared}:log"])
            .await
            .trim()
            .parse()
            .ok()?;
        (s.position.id.ms > 0 && xlen < 30).then_some(())
    })
    .await;

    // Another node, with its own empty data directory, loads the document: what is no longer
    // in the log can only come from the shared snapshot.
    let d2 = tempfile::tempdir().expect("tempdir");
    let reader_node = ServerProcess::spawn_env(d2.path(), &args, &s3.env()).await;
    node_has_all(reader_node.addr, "shared", &tokens).await;
    reader_node.terminate().await;
    writer_node.terminate().await;
}
