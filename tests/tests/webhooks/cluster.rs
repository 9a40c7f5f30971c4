//! Change webhooks on a real three-master Redis Cluster: marks in per-slot sets, found by the
//! cluster scan; two nodes sending documents of every master; a sender killed mid-failure.

use super::*;
use chorus_tests::redis::{RedisCluster, cli, own_slots, slot_of};

/// `per_master` document names (`prefix-N`) in the slots of each master.
async fn docs_on_every_master(
    cluster: &RedisCluster,
    per_master: usize,
    prefix: &str,
) -> Vec<String> {
    let mut names = Vec::new();
    for &port in &cluster.ports {
        let slots = own_slots(port).await;
        let on = |d: &String| slots.iter().any(|&(a, b)| (a..=b).contains(&slot_of(d)));
        names.extend(
            (0..)
                .map(|i| format!("{prefix}-{i}"))
                .filter(on)
                .take(per_master),
        );
    }
    names
}

/// The mark set a document's slot should use: `chorus:{N}:undelivered`, N the smallest number
/// hashing to that slot (computed here independently of the server).
fn mark_key_of(doc: &str) -> String {
    let slot = slot_of(doc);
    let tag = (0u32..)
        .find(|n| slot_of(&n.to_string()) == slot)
        .expect("a tag for every slot");
    format!("chorus:{{{tag}}}:undelivered")
}

async fn connect(cluster: &RedisCluster, tracker: &TaskTracker) -> Arc<dyn Backplane> {
    Arc::new(
        RedisBackplane::connect(
            RedisSettings::from_urls(
                &[cluster.url()],
                Duration::from_secs(2),
                Duration::from_secs(2),
            ),
            rand::random(),
            tracker,
        )
        .await
        .expect("connect"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_redis_cluster_deliver_documents_of_every_master_each_range_once() {
    let cluster = RedisCluster::start().await;
    let receiver = Receiver::start(Mode::Ok).await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let url = receiver.url();
    let nodes = chorus_tests::multinode::start_nodes(&cluster.url(), snaps.path(), 2, |c| {
        hooks(c, std::slice::from_ref(&url), 200, 2_000)
    })
    .await;
    let names = docs_on_every_master(&cluster, 2, "spread").await;
    let mut editors: Vec<Editor> = names.iter().map(|d| Editor::new(d)).collect();
    for round in 0..4 {
        for (i, e) in editors.iter_mut().enumerate() {
            // Each document is written through both nodes.
            e.edit(nodes[(round + i) % 2].addr, &format!("{round}"))
                .await;
        }
    }
    for e in &editors {
        let all = wait_delivered_to(&receiver, &e.doc_id, e.last()).await;
        assert_chained(&all);
        assert_eq!(all[0].from(), None);
        let ranges: HashSet<(Option<&str>, &str)> =
            all.iter().map(|d| (d.from(), d.to())).collect();
        assert_eq!(ranges.len(), all.len(), "no range delivered twice: {all:?}");
        assert_eq!(
            all.iter().map(Delivery::updates).sum::<u64>(),
            e.acked.len() as u64,
            "every change of {} delivered once",
            e.doc_id
        );
    }
    // Delivered everywhere: the compare-and-clear emptied every slot's mark set.
    for &port in &cluster.ports {
        eventually(
            "every mark cleared on this master",
            DEADLINE,
            || async move {
                let keys = cli(port, &["--scan", "--pattern", "chorus:{*}:undelivered"]).await?;
                keys.trim().is_empty().then_some(())
            },
        )
        .await;
    }
    for n in nodes {
        n.stop().await;
    }
}

/// Documents of every master, and three in one slot (a slot set larger than the scan batch of
/// 2): each append marks its document in its own slot's set, and a scan finds them all.
async fn the_cluster_scan_finds_every_marked_document(
    bp: &Arc<dyn Backplane>,
    cluster: &RedisCluster,
) {
    let store = bp.enable_webhooks().expect("enable webhooks");
    let mut names = docs_on_every_master(cluster, 2, "scanned").await;
    let crowded_slot = slot_of("crowded-0");
    names.extend(
        (0..)
            .map(|i| format!("crowded-{i}"))
            .filter(|d| slot_of(d) == crowded_slot)
            .take(3),
    );
    for name in &names {
        let doc = DocId::parse(name).expect("doc");
        bp.append(&doc, Bytes::from_static(b"x"), None, None)
            .await
            .expect("append");
        let member = cli(
            cluster.ports[0],
            &["-c", "SISMEMBER", &mark_key_of(name), name],
        )
        .await;
        assert_eq!(
            member.as_deref().map(str::trim),
            Some("1"),
            "{name} is marked in its slot's set"
        );
    }
    let mut found = HashSet::new();
    let mut from = None;
    let mut round_trips = 0;
    loop {
        let (docs, next) = store.marked(from, 2).await.expect("scan marks");
        round_trips += 1;
        found.extend(docs.into_iter().map(|d| d.as_str().to_string()));
        if next.is_none() {
            break;
        }
        from = next;
    }
    for name in &names {
        assert!(found.contains(name), "the scan finds {name}: {found:?}");
    }
    // One probe per run of up to 1024 slots of one master (16 + one per master boundary),
    // and at most two more per non-empty set (a batch that fills up, a set read by SSCAN);
    // walking the slots one by one would take 16384.
    let bound = 16 + cluster.ports.len() + 2 * names.len();
    assert!(
        round_trips <= bound,
        "a full scan took {round_trips} batches (bound {bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_cluster_store_marks_in_slot_sets_scans_clears_at_the_head_keeps_cursors_and_leases_to_one_node()
 {
    let cluster = RedisCluster::start().await;
    let tracker = TaskTracker::new();
    let (a, b) = (
        connect(&cluster, &tracker).await,
        connect(&cluster, &tracker).await,
    );
    the_cluster_scan_finds_every_marked_document(&a, &cluster).await;
    store_conformance(a, Some(b.clone())).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_killing_the_sending_node_hands_the_document_to_the_other_after_the_lease()
 {
    let cluster = RedisCluster::start().await;
    let lease_key = "chorus:{handover-c}:hooklease";
    let holder = || async {
        cli(cluster.ports[0], &["-c", "GET", lease_key])
            .await
            .expect("GET the lease")
            .trim()
            .to_string()
    };
    // Only B's scan of the slot sets can find the document once A is gone.
    handover(&cluster.url(), "handover-c", holder).await;
}

/// Every document name a full scan of `store` returns (any batch failing: `None`).
async fn full_scan(
    store: &Arc<dyn chorus_server::backplane::webhook_store::WebhookStore>,
) -> Option<HashSet<String>> {
    let mut found = HashSet::new();
    let mut from = None;
    loop {
        let (docs, next) = store.marked(from, 256).await.ok()?;
        found.extend(docs.into_iter().map(|d| d.as_str().to_string()));
        if next.is_none() {
            return Some(found);
        }
        from = next;
    }
}

/// Slots holding marks move to another master after the node read the slot map: scans that
/// meet the move fail (and make the node re-read the map) rather than skip the moved marks,
/// and a scan soon finds every marked document again, without waiting for the 30 s refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reshard_the_cluster_scan_finds_the_marks_in_the_moved_slots() {
    let cluster = RedisCluster::start().await;
    let tracker = TaskTracker::new();
    let bp = connect(&cluster, &tracker).await;
    let store = bp.enable_webhooks().expect("enable webhooks");
    let first = own_slots(cluster.ports[0]).await;
    let names: Vec<String> = (0..)
        .map(|i| format!("moving-{i}"))
        .filter(|d| first.iter().any(|&(a, b)| (a..=b).contains(&slot_of(d))))
        .take(12)
        .collect();
    for name in &names {
        let doc = DocId::parse(name).expect("doc");
        bp.append(&doc, Bytes::from_static(b"x"), None, None)
            .await
            .expect("append");
    }
    let all: HashSet<String> = names.iter().cloned().collect();
    assert_eq!(full_scan(&store).await, Some(all.clone()));

    let id = |p: u16| async move {
        cli(p, &["CLUSTER", "MYID"])
            .await
            .expect("myid")
            .trim()
            .to_string()
    };
    let (from_id, to_id) = (id(cluster.ports[0]).await, id(cluster.ports[1]).await);
    let seed = format!("127.0.0.1:{}", cluster.ports[0]);
    let moved = cli(
        cluster.ports[0],
        &[
            "--cluster",
            "reshard",
            &seed,
            "--cluster-from",
            &from_id,
            "--cluster-to",
            &to_id,
            "--cluster-slots",
            "3000",
            "--cluster-yes",
        ],
    )
    .await;
    assert!(moved.is_some(), "redis-cli --cluster reshard failed");
    let second = own_slots(cluster.ports[1]).await;
    assert!(
        names
            .iter()
            .any(|d| second.iter().any(|&(a, b)| (a..=b).contains(&slot_of(d)))),
        "some marked documents' slots moved to the second master"
    );
    eventually(
        "a scan finds every mark after the reshard",
        DEADLINE,
        || async {
            // A scan either fails or sees every mark: none may silently skip moved slots.
            let found = full_scan(&store).await?;
            assert_eq!(found, all, "a completed scan after the reshard");
            Some(())
        },
    )
    .await;
    bp.close().await;
}
