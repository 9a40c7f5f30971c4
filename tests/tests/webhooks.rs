//! Change webhooks against real servers: an in-process receiver that checks every request's
//! signature; embedded nodes (in process, and a `chorus` process killed with SIGKILL) and two
//! nodes on one Redis (in process, and processes, one killed while it holds the lease); and
//! the webhook store of both logs on its own; the same on a Redis Cluster (`webhooks/cluster.rs`).

#[path = "webhooks/cluster.rs"]
mod cluster;

use bytes::Bytes;
use chorus_protocol::DocId;
use chorus_server::backplane::Backplane;
use chorus_server::backplane::embedded::EmbeddedBackplane;
use chorus_server::backplane::redis::{RedisBackplane, RedisSettings};
use chorus_tests::redis::RedisServer;
use chorus_tests::webhook::{Delivery, Editor, Mode, Receiver, Replica, SECRET, process_flags};
use chorus_tests::{DEADLINE, ServerProcess, TestServer, eventually};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

fn hooks(c: &mut chorus_server::Config, urls: &[String], debounce_ms: u64, max_wait_ms: u64) {
    c.webhook_url = urls.to_vec();
    c.webhook_secret = Some(SECRET.into());
    c.webhook_debounce = Duration::from_millis(debounce_ms);
    c.webhook_max_wait = Duration::from_millis(max_wait_ms);
    c.webhook_timeout = Duration::from_millis(500);
    c.webhook_lease = Duration::from_secs(2);
}

/// Waits for `n` deliveries of `doc` at `r`, and returns them.
async fn wait_deliveries(r: &Receiver, doc: &str, n: usize) -> Vec<Delivery> {
    eventually(&format!("{n} deliveries of {doc}"), DEADLINE, || async {
        let d = r.deliveries_of(doc);
        (d.len() >= n).then_some(d)
    })
    .await
}

/// Waits until a delivery of `doc` reaches `to`; returns every delivery of `doc` by then.
async fn wait_delivered_to(r: &Receiver, doc: &str, to: &str) -> Vec<Delivery> {
    eventually(&format!("{doc} delivered up to {to}"), DEADLINE, || async {
        let d = r.deliveries_of(doc);
        d.iter().any(|x| x.to() == to).then_some(d)
    })
    .await
}

/// Consecutive deliveries of one document chain: each starts where the previous ended.
fn assert_chained(d: &[Delivery]) {
    for pair in d.windows(2) {
        assert_eq!(
            pair[1].from(),
            Some(pair[0].to()),
            "deliveries chain: {:?} then {:?}",
            pair[0].body,
            pair[1].body
        );
    }
}

fn bytes_of(acked: &[(String, usize)]) -> u64 {
    acked.iter().map(|(_, n)| *n as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_one_delivery_after_the_debounce_and_the_next_range_replays_from_it() {
    let receiver = Receiver::start(Mode::Ok).await;
    // A debounce far longer than a POST takes, so the burst cannot split.
    let node = TestServer::start(|c| hooks(c, &[receiver.url()], 1_000, 5_000)).await;
    let mut editor = Editor::new("burst");
    for i in 0..5 {
        editor.edit(node.addr, &format!("a{i} ")).await;
    }
    let first = wait_deliveries(&receiver, "burst", 1).await;
    let d = &first[0];
    assert_eq!(d.body["event"], "document.changed");
    assert_eq!(
        d.from(),
        None,
        "the first delivery has no previous position"
    );
    assert_eq!(d.to(), editor.last());
    assert_eq!(d.updates(), 5, "the whole burst in one delivery");
    assert_eq!(d.bytes(), bytes_of(&editor.acked));
    assert!(
        chrono_like(d.body["sent_at"].as_str().expect("sent_at")),
        "{:?}",
        d.body
    );
    // The receiver loads the document as of the delivery.
    let replica = Replica::new();
    let (sync, position) = replica.catch_up(node.addr, "burst", None).await;
    assert_eq!((sync.as_str(), position.as_str()), ("full", d.to()));

    let first_acked = editor.acked.len();
    for i in 0..3 {
        editor.edit(node.addr, &format!("b{i} ")).await;
    }
    let all = wait_deliveries(&receiver, "burst", 2).await;
    assert_eq!(all.len(), 2, "one delivery per burst");
    let second = &all[1];
    assert_eq!(second.from(), Some(d.to()), "from is the previous to");
    assert_eq!(second.to(), editor.last());
    assert_eq!(second.updates(), 3);
    assert_eq!(second.bytes(), bytes_of(&editor.acked[first_acked..]));
    assert_ne!(second.delivery_id, d.delivery_id);
    // And catching up from `from` replays exactly what changed.
    let (sync, position) = replica.catch_up(node.addr, "burst", second.from()).await;
    assert_eq!((sync.as_str(), position.as_str()), ("replay", second.to()));
    assert_eq!(replica.text(), editor.text());
    node.stop().await;
}

/// `sent_at` is RFC 3339 (`2026-12-04T15:00:00.000Z`).
fn chrono_like(s: &str) -> bool {
    s.len() >= 20 && s.as_bytes()[4] == b'-' && s.as_bytes()[10] == b'T' && s.ends_with('Z')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_edits_are_delivered_by_the_max_wait() {
    let receiver = Receiver::start(Mode::Ok).await;
    let node = TestServer::start(|c| hooks(c, &[receiver.url()], 500, 1_200)).await;
    let mut editor = Editor::new("steady");
    // An edit every 100 ms never leaves a 500 ms pause: only the max wait sends.
    let started = std::time::Instant::now();
    let mut delivered_while_editing = 0;
    while started.elapsed() < Duration::from_millis(3_500) {
        editor.edit(node.addr, "x").await;
        delivered_while_editing = receiver.deliveries_of("steady").len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        delivered_while_editing >= 1,
        "a delivery arrived while the edits never paused"
    );
    let all = wait_delivered_to(&receiver, "steady", editor.last()).await;
    // 35 edits over 3.5 s with a 1.2 s max wait: about three ranges, then the tail.
    assert!(
        all.len() <= 6,
        "ranges, not a request per edit: {} deliveries",
        all.len()
    );
    assert_chained(&all);
    assert_eq!(all[0].from(), None);
    let total: u64 = all.iter().map(Delivery::updates).sum();
    assert_eq!(
        total,
        editor.acked.len() as u64,
        "every change counted once"
    );
    assert_eq!(
        all.iter().map(Delivery::bytes).sum::<u64>(),
        bytes_of(&editor.acked)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_and_later_changes_fold_into_one_range() {
    let receiver = Receiver::start(Mode::Fail).await;
    let node = TestServer::start(|c| hooks(c, &[receiver.url()], 100, 1_000)).await;
    let mut editor = Editor::new("retried");
    for i in 0..2 {
        editor.edit(node.addr, &format!("{i}")).await;
    }
    eventually("a failed delivery", DEADLINE, || async {
        (receiver.attempts() >= 1).then_some(())
    })
    .await;
    for i in 2..5 {
        editor.edit(node.addr, &format!("{i}")).await;
    }
    // Two more failed attempts: the second read the log after every edit (attempts to one
    // URL go one after another), so whatever is accepted from now on covers all five.
    let n = receiver.attempts();
    eventually("two retries after the last edit", DEADLINE, || async {
        (receiver.attempts() >= n + 2).then_some(())
    })
    .await;
    receiver.set_mode(Mode::Ok);
    let all = wait_delivered_to(&receiver, "retried", editor.last()).await;
    assert_eq!(all.len(), 1, "one delivery, once the receiver recovered");
    assert_eq!(all[0].from(), None);
    assert_eq!(
        all[0].updates(),
        5,
        "the later changes folded into the range"
    );
    assert_eq!(all[0].bytes(), bytes_of(&editor.acked));
    // Both outcomes are counted where operators look.
    let metrics = chorus_tests::http::get(node.addr, "/metrics")
        .await
        .expect("GET /metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    for series in [
        "chorus_webhook_deliveries_total{result=\"ok\"}",
        "chorus_webhook_deliveries_total{result=\"failed\"}",
        "chorus_webhook_pending_documents",
    ] {
        assert!(text.contains(series), "{series} in /metrics");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_past_a_trim_gets_its_cursor_and_catches_up_with_a_full_sync() {
    let receiver = Receiver::start(Mode::Ok).await;
    let node = TestServer::start(|c| {
        hooks(c, &[receiver.url()], 100, 1_000);
        c.compact_entries = 10;
        c.replay_window = Duration::ZERO;
        // The document keeps no recent entries of its own to replay from either.
        c.replay_memory_bytes = 64;
    })
    .await;
    let mut editor = Editor::new("trimmed");
    editor.edit(node.addr, "first ").await;
    let first = wait_delivered_to(&receiver, "trimmed", editor.last()).await;
    let delivered_to = first[0].to().to_string();
    receiver.set_mode(Mode::Fail);
    for i in 0..30 {
        editor.edit(node.addr, &format!("{i} ")).await;
    }
    eventually("compaction trimmed past the cursor", DEADLINE, || async {
        let replica = Replica::new();
        let (sync, _) = replica
            .catch_up(node.addr, "trimmed", Some(&delivered_to))
            .await;
        (sync == "full").then_some(())
    })
    .await;
    let n = receiver.attempts();
    eventually("two retries after the last edit", DEADLINE, || async {
        (receiver.attempts() >= n + 2).then_some(())
    })
    .await;
    receiver.set_mode(Mode::Ok);
    let all = wait_delivered_to(&receiver, "trimmed", editor.last()).await;
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[1].from(),
        Some(delivered_to.as_str()),
        "from is the cursor even though the log no longer holds what follows it"
    );
    assert!(all[1].updates() >= 1 && all[1].updates() <= 30);
    // The documented catch-up: a full sync instead of a replay with a gap.
    let replica = Replica::new();
    let (sync, position) = replica.catch_up(node.addr, "trimmed", all[1].from()).await;
    assert_eq!((sync.as_str(), position.as_str()), ("full", all[1].to()));
    assert_eq!(replica.text(), editor.text());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_url_does_not_hold_back_another() {
    let good = Receiver::start(Mode::Ok).await;
    let hanging = Receiver::start(Mode::Hang).await;
    let node = TestServer::start(|c| hooks(c, &[good.url(), hanging.url()], 100, 1_000)).await;
    let mut editor = Editor::new("two-urls");
    editor.edit(node.addr, "a").await;
    wait_delivered_to(&good, "two-urls", editor.last()).await;
    editor.edit(node.addr, "b").await;
    let to_good = wait_delivered_to(&good, "two-urls", editor.last()).await;
    assert_eq!(to_good.len(), 2);
    assert_chained(&to_good);
    assert!(hanging.attempts() >= 1, "the other URL was tried");
    assert!(hanging.deliveries().is_empty());
    hanging.set_mode(Mode::Ok);
    let to_hanging = wait_delivered_to(&hanging, "two-urls", editor.last()).await;
    assert_eq!(to_hanging.len(), 1);
    assert_eq!(to_hanging[0].from(), None);
    assert_eq!(to_hanging[0].updates(), 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_the_receiver_fails_delivers_from_its_durable_cursor_after_restart() {
    let receiver = Receiver::start(Mode::Ok).await;
    let urls = [receiver.url()];
    let flags = process_flags(
        &urls,
        &[
            "--webhook-debounce",
            "100ms",
            "--webhook-max-wait",
            "1s",
            "--webhook-timeout",
            "500ms",
            "--webhook-lease",
            "2s",
        ],
    );
    let data = tempfile::tempdir().expect("tempdir");
    let node = ServerProcess::spawn(data.path(), &flags).await;
    let addr = node.addr;
    let mut editor = Editor::new("killed");
    editor.edit(addr, "before ").await;
    let first = wait_delivered_to(&receiver, "killed", editor.last()).await;
    let delivered_to = first[0].to().to_string();

    receiver.set_mode(Mode::Fail);
    let acked_before = editor.acked.len();
    for i in 0..3 {
        editor.edit(addr, &format!("lost? {i} ")).await;
    }
    let attempts = receiver.attempts();
    eventually("a failed attempt before the kill", DEADLINE, || async {
        (receiver.attempts() > attempts).then_some(())
    })
    .await;
    node.kill9().await;

    receiver.set_mode(Mode::Ok);
    let node = ServerProcess::spawn_at(addr, data.path(), &flags).await;
    let all = wait_delivered_to(&receiver, "killed", editor.last()).await;
    assert_eq!(all.len(), 2);
    let after = &all[1];
    assert_eq!(
        after.from(),
        Some(delivered_to.as_str()),
        "from the durable cursor"
    );
    assert_eq!(
        after.updates(),
        3,
        "every change acknowledged before the kill"
    );
    assert_eq!(after.bytes(), bytes_of(&editor.acked[acked_before..]));
    let replica = Replica::new();
    replica.catch_up(addr, "killed", None).await;
    assert_eq!(replica.text(), editor.text());
    node.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_redis_send_each_range_once() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(Mode::Ok).await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let url = receiver.url();
    let nodes = chorus_tests::multinode::start_nodes(&redis.url(), snaps.path(), 2, |c| {
        hooks(c, std::slice::from_ref(&url), 200, 2_000)
    })
    .await;
    let mut editors: Vec<Editor> = (0..4)
        .map(|i| Editor::new(&format!("shared-{i}")))
        .collect();
    for round in 0..6 {
        for (i, e) in editors.iter_mut().enumerate() {
            // Each document is written through both nodes.
            e.edit(nodes[(round + i) % 2].addr, &format!("{round}"))
                .await;
        }
    }
    for e in &editors {
        let all = wait_delivered_to(&receiver, &e.doc_id, e.last()).await;
        assert_chained(&all);
        let ranges: HashSet<(Option<&str>, &str)> =
            all.iter().map(|d| (d.from(), d.to())).collect();
        assert_eq!(ranges.len(), all.len(), "no range delivered twice: {all:?}");
        assert_eq!(
            all.iter().map(Delivery::updates).sum::<u64>(),
            e.acked.len() as u64
        );
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sending_node_hands_the_document_to_the_other_after_the_lease() {
    let redis = RedisServer::start().await;
    let lease_key = "chorus:{handover}:hooklease";
    let holder = || async { redis.cli(&["GET", lease_key]).await.trim().to_string() };
    handover(&redis.url(), "handover", holder).await;
}

/// Two node processes on one Redis (`redis_url`: standalone or a cluster). Node A takes three
/// changes to `doc` and holds its sending lease while the receiver fails; A is killed with
/// SIGKILL and the receiver recovers. B, which never saw the changes, must find the document
/// by its scan once A's lease expired and deliver all three in one range. `holder` reads who
/// holds the lease.
async fn handover<F, Fut>(redis_url: &str, doc: &str, holder: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let receiver = Receiver::start(Mode::Fail).await;
    let urls = [receiver.url()];
    let snaps = tempfile::tempdir().expect("tempdir");
    let snap_flag = snaps.path().to_str().expect("path").to_string();
    let flags = process_flags(
        &urls,
        &[
            "--redis-url",
            redis_url,
            "--snapshot-dir",
            snap_flag.as_str(),
            "--webhook-debounce",
            "100ms",
            "--webhook-max-wait",
            "1s",
            "--webhook-timeout",
            "300ms",
            "--webhook-lease",
            "2s",
        ],
    );
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let a = ServerProcess::spawn(dir_a.path(), &flags).await;
    let b = ServerProcess::spawn(dir_b.path(), &flags).await;
    let mut editor = Editor::new(doc);
    for i in 0..3 {
        editor.edit(a.addr, &format!("{i}")).await;
    }
    eventually("node A tried and failed", DEADLINE, || async {
        (receiver.attempts() >= 1).then_some(())
    })
    .await;
    let sender = holder().await;
    assert!(!sender.is_empty(), "the sending node holds the lease");
    a.kill9().await;
    receiver.set_mode(Mode::Ok);
    let all = wait_delivered_to(&receiver, doc, editor.last()).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].from(), None);
    assert_eq!(
        all[0].updates(),
        3,
        "every change acknowledged by the killed node"
    );
    // B sent it: a lease held by another node id than A's (or released after it finished).
    assert_ne!(holder().await, sender, "the killed node's lease is gone");
    b.terminate().await;
}

/// The webhook store of both logs: an append marks its document; a mark is cleared only at the
/// head it was read at (a racing append keeps it); cursors persist; one lease holder at a time.
async fn store_conformance(bp: Arc<dyn Backplane>, other_node: Option<Arc<dyn Backplane>>) {
    let store = bp.enable_webhooks().expect("enable webhooks");
    let doc = DocId::parse("marked").expect("doc");
    let append = |n: u8| bp.append(&doc, Bytes::from(vec![n; 8]), None, None);
    let p1 = append(1).await.expect("append");
    let marked = || async {
        let mut all = Vec::new();
        let mut from = None;
        loop {
            let (docs, next) = store.marked(from, 2).await.expect("scan marks");
            all.extend(docs);
            if next.is_none() {
                return all;
            }
            from = next;
        }
    };
    eventually("the append marked its document", DEADLINE, || async {
        marked().await.contains(&doc).then_some(())
    })
    .await;
    let p2 = append(2).await.expect("append");
    assert!(
        !store
            .clear_if_head(&doc, p1.epoch, p1.id)
            .await
            .expect("clear"),
        "an append after the head that was read keeps the mark"
    );
    assert!(marked().await.contains(&doc));
    assert!(
        store
            .clear_if_head(&doc, p2.epoch, p2.id)
            .await
            .expect("clear")
    );
    assert!(!marked().await.contains(&doc));

    assert_eq!(store.cursor(&doc, "http://a/").await.expect("cursor"), None);
    store
        .set_cursor(&doc, "http://a/", p2)
        .await
        .expect("set cursor");
    assert_eq!(
        store.cursor(&doc, "http://a/").await.expect("cursor"),
        Some(p2)
    );
    assert_eq!(store.cursor(&doc, "http://b/").await.expect("cursor"), None);

    let ttl = Duration::from_secs(5);
    assert!(store.lease(&doc, ttl).await.expect("lease"));
    assert!(
        store.lease(&doc, ttl).await.expect("renew"),
        "the holder renews"
    );
    if let Some(other) = other_node {
        let theirs = other.enable_webhooks().expect("enable webhooks");
        assert!(
            !theirs.lease(&doc, ttl).await.expect("lease"),
            "held by the first node"
        );
        store.release(&doc).await;
        assert!(
            theirs.lease(&doc, ttl).await.expect("lease"),
            "free once released"
        );
    }
    bp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_marks_clears_at_the_head_and_keeps_cursors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tracker = TaskTracker::new();
    let bp =
        EmbeddedBackplane::open(&dir.path().join("log.redb"), 4 << 20, &tracker).expect("open");
    store_conformance(Arc::new(bp), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_marks_clears_at_the_head_keeps_cursors_and_leases_to_one_node() {
    let redis = RedisServer::start().await;
    let tracker = TaskTracker::new();
    let connect = || async {
        let bp: Arc<dyn Backplane> = Arc::new(
            RedisBackplane::connect(
                RedisSettings::from_urls(
                    &[redis.url()],
                    Duration::from_secs(2),
                    Duration::from_secs(2),
                ),
                rand::random(),
                &tracker,
            )
            .await
            .expect("connect"),
        );
        bp
    };
    let (a, b) = (connect().await, connect().await);
    store_conformance(a, Some(b.clone())).await;
    b.close().await;
}
