//! The convergence test against a real three-master Redis Cluster: documents spread over the
//! shards by hash tag, one reader per shard on every node.

use chorus_tests::multinode::{converge, node_has_all, start_nodes, write_tokens};
use chorus_tests::native::NativeClient;
use chorus_tests::redis::RedisCluster;
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
