//! Many nodes on a real three-master Redis Cluster: documents spread over the shards by hash
//! tag, one reader per shard on every node; resharding mid-run; lost wake-ups; a new master.

use chorus_protocol::{DocId, ServerFrame};
use chorus_server::backplane::redis::{RedisBackplane, RedisSettings};
use chorus_server::backplane::{Backplane, Entry, EntrySink};
use chorus_tests::multinode::{converge, node_has_all, start_nodes, write_tokens};
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::redis::{RedisCluster, own_slots, slot_of};
use chorus_tests::{DEADLINE, eventually};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_on_a_three_master_cluster() {
    let cluster = RedisCluster::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&cluster.url(), snaps.path(), 3, |c| c.compact_entries = 40).await;
    // Enough documents that every shard holds some.
    let docs: Vec<String> = (0..6).map(|i| format!("cdoc-{i}")).collect();
    let mut tasks = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        for (j, node) in nodes.iter().enumerate() {
            let mut c = NativeClient::connect(&node.ws_url()).await;
            c.subscribe_synced(doc).await;
            let doc = doc.clone();
            tasks.push(tokio::spawn(async move {
                let w =
                    write_tokens(c, &doc, format!("d{i}n{j}"), 15, Duration::from_millis(2)).await;
                (doc, w)
            }));
        }
    }
    let mut by_doc: std::collections::HashMap<String, Vec<chorus_tests::multinode::Writer>> =
        Default::default();
    for t in tasks {
        let (doc, w) = t.await.expect("writer");
        assert_eq!(w.failed, 0, "every update acked with the cluster up");
        by_doc.entry(doc).or_default().push(w);
    }
    for (doc, writers) in by_doc.iter_mut() {
        let acked: Vec<String> = writers.iter().flat_map(|w| w.acked.clone()).collect();
        assert_eq!(acked.len(), 45);
        let mut refs: Vec<&mut NativeClient> = writers.iter_mut().map(|w| &mut w.client).collect();
        converge(&mut refs, doc, &acked).await;
        for n in &nodes {
            node_has_all(n.addr, doc, &acked).await;
        }
    }
    // The documents really are spread: more than one master holds a log.
    let mut masters_with_logs = 0;
    for &p in &cluster.ports {
        let keys = chorus_tests::redis::cli(p, &["--scan", "--pattern", "chorus:{cdoc-*}:log"])
            .await
            .unwrap_or_default();
        if !keys.trim().is_empty() {
            masters_with_logs += 1;
        }
    }
    assert!(masters_with_logs >= 2, "documents spread over the shards");
}

/// Slots move between masters while clients write: the nodes follow MOVED/ASK redirections
/// (writes and reads), and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_mid_run_loses_nothing() {
    let cluster = RedisCluster::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&cluster.url(), snaps.path(), 2, |_| {}).await;
    let docs: Vec<String> = (0..6).map(|i| format!("rdoc-{i}")).collect();
    let mut tasks = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        for (j, node) in nodes.iter().enumerate() {
            let mut c = NativeClient::connect(&node.ws_url()).await;
            c.subscribe_synced(doc).await;
            let doc = doc.clone();
            tasks.push(tokio::spawn(async move {
                let w =
                    write_tokens(c, &doc, format!("r{i}n{j}"), 60, Duration::from_millis(10)).await;
                (doc, w)
            }));
        }
    }
    // Move a third of the first master's slots (and their keys) to the second one while the
    // clients write.
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for &p in &cluster.ports[..2] {
            let id = chorus_tests::redis::cli(p, &["CLUSTER", "MYID"])
                .await
                .expect("myid");
            v.push(id.trim().to_string());
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let from = format!("127.0.0.1:{}", cluster.ports[0]);
    let moved = chorus_tests::redis::cli(
        cluster.ports[0],
        &[
            "--cluster",
            "reshard",
            &from,
            "--cluster-from",
            &ids[0],
            "--cluster-to",
            &ids[1],
            "--cluster-slots",
            "2000",
            "--cluster-yes",
        ],
    )
    .await;
    assert!(moved.is_some(), "redis-cli --cluster reshard failed");
    let mut by_doc: std::collections::HashMap<String, Vec<chorus_tests::multinode::Writer>> =
        Default::default();
    for t in tasks {
        let (doc, w) = t.await.expect("writer");
        by_doc.entry(doc).or_default().push(w);
    }
    for (doc, writers) in by_doc.iter_mut() {
        let acked: Vec<String> = writers.iter().flat_map(|w| w.acked.clone()).collect();
        for w in writers.iter_mut() {
            if w.failed > 0 {
                chorus_tests::multinode::resend_until_acked(&mut w.client, doc).await;
            }
        }
        let mut refs: Vec<&mut NativeClient> = writers.iter_mut().map(|w| &mut w.client).collect();
        converge(&mut refs, doc, &acked).await;
        for n in &nodes {
            node_has_all(n.addr, doc, &acked).await;
        }
    }
}

/// Moves one slot that holds no keys from the master on `from` to the master on `to`, the way
/// `redis-cli --cluster reshard` does (importing, migrating, then assign everywhere).
async fn move_empty_slot(cluster: &RedisCluster, slot: u16, from: u16, to: u16) {
    let id = |p: u16| async move {
        chorus_tests::redis::cli(p, &["CLUSTER", "MYID"])
            .await
            .expect("myid")
            .trim()
            .to_string()
    };
    let (from_id, to_id) = (id(from).await, id(to).await);
    let slot = slot.to_string();
    let ok = |r: Option<String>| assert_eq!(r.as_deref().map(str::trim), Some("OK"));
    ok(chorus_tests::redis::cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]).await);
    ok(chorus_tests::redis::cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]).await);
    ok(chorus_tests::redis::cli(to, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).await);
    for &p in &cluster.ports {
        if p != to {
            ok(chorus_tests::redis::cli(p, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]).await);
        }
    }
    let slot: u16 = slot.parse().expect("slot");
    eventually("the slot is served by its new master", DEADLINE, || async {
        own_slots(to)
            .await
            .iter()
            .any(|&(a, b)| (a..=b).contains(&slot))
            .then_some(())
    })
    .await;
}

/// A node that read the slot map before a slot moved wakes, for a document in that slot, a
/// different reader than a node that started after the move: the older node's wake-ups for it
/// are lost. While another document of the old shard keeps that shard reader busy with wake
/// traffic (so its blocking read never times out), a write on the newer node must still
/// reach the older node's subscriber within a few seconds: shard readers read all their
/// documents on a timer, wake-ups or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wake_up_delays_a_document_by_about_a_second_under_wake_traffic() {
    let cluster = RedisCluster::start().await;
    let (a, b) = (cluster.ports[0], cluster.ports[1]);
    let a_slots = own_slots(a).await;
    let on_a = |d: &String| a_slots.iter().any(|&(x, y)| (x..=y).contains(&slot_of(d)));
    let quiet = (0..)
        .map(|i| format!("quiet-{i}"))
        .find(on_a)
        .expect("quiet");
    let busy = (0..)
        .map(|i| format!("busy-{i}"))
        .find(|d| on_a(d) && slot_of(d) != slot_of(&quiet))
        .expect("busy");
    let snaps = tempfile::tempdir().expect("tempdir");
    let old = start_nodes(&cluster.url(), snaps.path(), 1, |_| {}).await;
    let mut watcher = NativeClient::connect(&old[0].ws_url()).await;
    watcher.subscribe_synced(&quiet).await;
    let mut writer = NativeClient::connect(&old[0].ws_url()).await;
    writer.subscribe_synced(&busy).await;
    let first = writer.insert(&busy, 0, "b").await;
    writer.wait_acked(first).await;

    move_empty_slot(&cluster, slot_of(&quiet), a, b).await;
    let new = start_nodes(&cluster.url(), snaps.path(), 1, |_| {}).await;

    // Wake traffic for `busy` on the old node, every 100 ms, until the check below is done.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = stop.clone();
        let busy = busy.clone();
        async move {
            let mut acked = 0;
            while !stop.load(Ordering::Relaxed) {
                let seq = writer.insert(&busy, 0, "b").await;
                let until = tokio::time::Instant::now() + Duration::from_millis(100);
                loop {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    match writer.next_event(left).await {
                        Some(Event::Frame(ServerFrame::Ack { seq: Some(s), .. })) if s == seq => {
                            acked += 1
                        }
                        Some(Event::Frame(_)) => {}
                        Some(Event::Closed(c)) => panic!("busy writer closed: {c:?}"),
                        None => break,
                    }
                }
            }
            acked
        }
    });

    let mut author = NativeClient::connect(&new[0].ws_url()).await;
    author.subscribe_synced(&quiet).await;
    let seq = author.insert(&quiet, 0, "hello").await;
    author.wait_acked(seq).await;
    let written = tokio::time::Instant::now();
    // Deadline: a full read is due at least every second; the rest is slack for a loaded CI.
    let until = written + Duration::from_secs(5);
    while watcher.text(&quiet) != "hello" {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match watcher.next_event(left).await {
            Some(Event::Frame(_)) => {}
            other => panic!(
                "the old node never read {quiet} while {busy} kept its shard reader woken \
                 (after {:?}): {other:?}",
                written.elapsed()
            ),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let acked = traffic.await.expect("traffic task");
    assert!(
        acked >= 5,
        "the busy document really was written meanwhile ({acked} acks)"
    );
}

/// Records which entries a backplane's readers delivered.
#[derive(Default)]
struct Delivered(std::sync::Mutex<Vec<chorus_protocol::StreamId>>);

impl EntrySink for Delivered {
    fn deliver(&self, _doc: &DocId, _epoch: u64, entries: Vec<Entry>) {
        self.0
            .lock()
            .expect("lock")
            .extend(entries.iter().map(|e| e.id));
    }
}

/// A master joins and takes slots: the node re-reads the slot map on its own (every 30 s)
/// and starts a shard reader for it; a document in the moved slots is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_master_gets_a_shard_reader_after_the_slot_map_refresh() {
    let mut cluster = RedisCluster::start().await;
    let tracker = tokio_util::task::TaskTracker::new();
    let bp = RedisBackplane::connect(
        RedisSettings::from_urls(
            &[cluster.url()],
            Duration::from_secs(2),
            Duration::from_secs(2),
        ),
        rand::random(),
        &tracker,
    )
    .await
    .expect("connect");
    let sink = Arc::new(Delivered::default());
    let weak: std::sync::Weak<dyn EntrySink> =
        Arc::downgrade(&(sink.clone() as Arc<dyn EntrySink>));
    bp.attach(weak);
    assert_eq!(bp.shards(), 3);

    let new = cluster.add_master().await;
    let id = |p: u16| async move {
        chorus_tests::redis::cli(p, &["CLUSTER", "MYID"])
            .await
            .expect("myid")
            .trim()
            .to_string()
    };
    let (from, to) = (id(cluster.ports[0]).await, id(new).await);
    let seed = format!("127.0.0.1:{}", cluster.ports[0]);
    // Right after a join redis-cli may find the masters not yet agreeing: wait until they do.
    // A reshard that fails half-way leaves slots open; `--cluster fix` closes them before the
    // next attempt (seen once on a loaded machine).
    eventually("the masters agree on the new one", DEADLINE * 2, || {
        let seed = seed.clone();
        let port = cluster.ports[0];
        async move { chorus_tests::redis::cli(port, &["--cluster", "check", &seed]).await }
    })
    .await;
    eventually(
        "redis-cli --cluster reshard to the new master",
        DEADLINE * 3,
        || {
            let (from, to, seed) = (from.clone(), to.clone(), seed.clone());
            let port = cluster.ports[0];
            async move {
                let done = chorus_tests::redis::cli(
                    port,
                    &[
                        "--cluster",
                        "reshard",
                        &seed,
                        "--cluster-from",
                        &from,
                        "--cluster-to",
                        &to,
                        "--cluster-slots",
                        "500",
                        "--cluster-yes",
                    ],
                )
                .await;
                if done.is_none() {
                    let _ = chorus_tests::redis::cli(
                        port,
                        &["--cluster", "fix", &seed, "--cluster-yes"],
                    )
                    .await;
                }
                done
            }
        },
    )
    .await;
    let moved = own_slots(new).await;
    assert!(!moved.is_empty(), "the new master serves slots");

    // The periodic refresh (30 s) plus slack.
    eventually(
        "a fourth shard reader after the refresh",
        Duration::from_secs(45),
        || async { (bp.shards() == 4).then_some(()) },
    )
    .await;
    let doc = (0..)
        .map(|i| format!("moved-{i}"))
        .find(|d| moved.iter().any(|&(a, b)| (a..=b).contains(&slot_of(d))))
        .expect("a document on the new master");
    let doc = DocId::parse(&doc).expect("doc");
    bp.watch(&doc, chorus_protocol::StreamId::ZERO);
    let p = bp
        .append(&doc, bytes::Bytes::from_static(b"1"), None, None)
        .await
        .expect("append");
    eventually("the entry is delivered", DEADLINE, || async {
        sink.0.lock().expect("lock").contains(&p.id).then_some(())
    })
    .await;
    bp.close().await;
}
