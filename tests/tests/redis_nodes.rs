//! Many nodes on one Redis: convergence with clients spread over three nodes, resume on
//! another node, Redis restarted and flushed mid-run, a node killed with SIGKILL, and presence
//! across nodes (and its expiry when a node dies), a POST whose node cannot apply it, and a
//! node that finds the log trimmed past what it applied (cut off while another compacted).

use chorus_protocol::ServerFrame;
use chorus_tests::multinode::{
    Writer, awareness_update, converge, node_has_all, resend_until_acked, send_awareness,
    start_nodes, wait_awareness, write_tokens,
};
use chorus_tests::native::NativeClient;
use chorus_tests::redis::RedisServer;
use chorus_tests::{DEADLINE, ServerProcess};
use std::time::Duration;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, Transact};

const DOC: &str = "shared";

/// Spawns one writer per client, all at once, and collects them.
async fn edit_concurrently(clients: Vec<NativeClient>, count: usize) -> Vec<Writer> {
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(write_tokens(
                c,
                DOC,
                format!("c{i}"),
                count,
                Duration::from_millis(2),
            ))
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("writer task"));
    }
    out
}

async fn clients_on(urls: &[String], per_node: usize) -> Vec<NativeClient> {
    let mut clients = Vec::new();
    for _ in 0..per_node {
        for url in urls {
            let mut c = NativeClient::connect(url).await;
            c.subscribe_synced(DOC).await;
            clients.push(c);
        }
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_byte_identically() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    // A low compaction threshold so nodes compact (under the lock) during the run.
    let nodes = start_nodes(&redis.url(), snaps.path(), 3, |c| c.compact_entries = 40).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.ws_url()).collect();
    let clients = clients_on(&urls, 2).await;
    let mut writers = edit_concurrently(clients, 25).await;
    let acked: Vec<String> = writers.iter().flat_map(|w| w.acked.clone()).collect();
    assert_eq!(acked.len(), 6 * 25, "every update acked with Redis up");
    let mut refs: Vec<&mut NativeClient> = writers.iter_mut().map(|w| &mut w.client).collect();
    let text = converge(&mut refs, DOC, &acked).await;
    for n in &nodes {
        node_has_all(n.addr, DOC, &acked).await;
    }
    // Every node's own copy is identical too.
    let mut states = Vec::new();
    for n in &nodes {
        let r = chorus_tests::http::get(n.addr, &format!("/v1/docs/{DOC}"))
            .await
            .expect("GET");
        let d = yrs::Doc::new();
        d.transact_mut()
            .apply_update(yrs::Update::decode_v1(&r.body).expect("decode"))
            .expect("apply");
        states.push(d.transact().state_vector());
    }
    assert!(states.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(text.matches('[').count(), 150);
    // Every node reads the document as the same data, and inspects it at the same position
    // with its own two subscribers.
    let mut positions = Vec::new();
    for n in &nodes {
        let json = chorus_tests::http::get(n.addr, &format!("/v1/docs/{DOC}/json"))
            .await
            .expect("GET")
            .json();
        assert_eq!(json, serde_json::json!({ "t": text }));
        let i = chorus_tests::http::get(n.addr, &format!("/v1/docs/{DOC}/inspect"))
            .await
            .expect("GET")
            .json();
        assert_eq!(i["hot"], true, "{i}");
        assert_eq!(i["clients"], 6, "one writer session per client: {i}");
        assert_eq!(i["subscribers"], serde_json::json!({"native": 2}), "{i}");
        positions.push(i["position"].clone());
    }
    assert!(positions.windows(2).all(|w| w[0] == w[1]), "{positions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_replays_only_the_missed_entries() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&redis.url(), snaps.path(), 3, |_| {}).await;
    let mut a = NativeClient::connect(&nodes[0].ws_url()).await;
    a.subscribe_synced(DOC).await;
    for i in 0..5 {
        let s = a.insert(DOC, i, "a").await;
        a.wait_acked(s).await;
    }
    let left_at = a.positions[DOC];
    let a_client = a.doc(DOC).client_id();
    let a_state = a.docs.remove(DOC).expect("doc");
    a.close().await;

    // Meanwhile someone on node 2 writes.
    let mut b = NativeClient::connect(&nodes[1].ws_url()).await;
    b.subscribe_synced(DOC).await;
    let b_client = b.doc(DOC).client_id();
    let mut last = 0;
    for _ in 0..3 {
        last = b.insert(DOC, 0, "b").await;
    }
    b.wait_acked(last).await;

    // The first client comes back on node 3 (where the document is not even loaded yet).
    let mut back = NativeClient::connect(&nodes[2].ws_url()).await;
    back.docs.insert(DOC.to_string(), a_state);
    back.positions.insert(DOC.to_string(), left_at);
    back.subscribe(DOC).await;
    let (update, position, replay) = back.wait_synced(DOC).await;
    assert!(replay, "a position still in the log is answered by replay");
    assert!(position.id > left_at.id);
    let u = yrs::Update::decode_v1(&update).expect("decode");
    let sv = u.state_vector();
    assert!(
        sv.contains_client(&b_client),
        "the missed entries are there"
    );
    assert!(
        !sv.contains_client(&a_client),
        "nothing the client already had is sent again"
    );
    assert_eq!(back.text(DOC), "bbbaaaaa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_loses_no_acked_update() {
    let mut redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&redis.url(), snaps.path(), 3, |c| {
        c.redis_timeout = Duration::from_millis(500);
    })
    .await;
    let urls: Vec<String> = nodes.iter().map(|n| n.ws_url()).collect();
    let clients = clients_on(&urls, 1).await;
    let run = tokio::spawn(edit_concurrently(clients, 60));
    // Kill Redis while the clients are writing, and bring it back with its data.
    tokio::time::sleep(Duration::from_millis(150)).await;
    redis.kill9().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;
    let mut writers = run.await.expect("run");
    assert!(
        writers.iter().any(|w| w.failed > 0),
        "the outage must hit the run (else this test proves nothing)"
    );
    let acked: Vec<String> = writers.iter().flat_map(|w| w.acked.clone()).collect();
    let all: Vec<String> = writers
        .iter()
        .flat_map(|w| w.tokens.iter().map(|(_, t)| t.clone()))
        .collect();
    // Clients resend what was not acknowledged (the sockets stayed open throughout).
    for w in &mut writers {
        assert!(
            w.client.closed.is_none(),
            "sockets stay open while Redis is away"
        );
        if w.failed > 0 {
            resend_until_acked(&mut w.client, DOC).await;
        }
    }
    let failed: usize = writers.iter().map(|w| w.failed).sum();
    eprintln!(
        "acked {} of {}, {failed} failed while Redis was down",
        acked.len(),
        all.len()
    );
    let mut refs: Vec<&mut NativeClient> = writers.iter_mut().map(|w| &mut w.client).collect();
    converge(&mut refs, DOC, &all).await;
    for n in &nodes {
        node_has_all(n.addr, DOC, &all).await;
    }
    // And from Redis alone: a node that loads the document fresh has every acked update.
    let fresh = chorus_tests::TestServer::start(|c| {
        c.redis_url = vec![redis.url()];
        c.snapshot_dir = Some(tempfile::tempdir().expect("t").keep());
    })
    .await;
    node_has_all(fresh.addr, DOC, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_means_new_epoch_and_a_resync() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&redis.url(), snaps.path(), 3, |_| {}).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.ws_url()).collect();
    let clients = clients_on(&urls, 1).await;
    let mut before = edit_concurrently(clients, 10).await;
    let acked_before: Vec<String> = before.iter().flat_map(|w| w.acked.clone()).collect();
    {
        let mut refs: Vec<&mut NativeClient> = before.iter_mut().map(|w| &mut w.client).collect();
        converge(&mut refs, DOC, &acked_before).await;
    }
    let old_epoch = before[0].client.positions[DOC].epoch;

    redis.cli(&["FLUSHALL"]).await;

    let clients: Vec<NativeClient> = before.into_iter().map(|w| w.client).collect();
    let mut after = edit_concurrently(clients, 10).await;
    let mut all = acked_before.clone();
    all.extend(after.iter().flat_map(|w| w.acked.clone()));
    let mut refs: Vec<&mut NativeClient> = after.iter_mut().map(|w| &mut w.client).collect();
    converge(&mut refs, DOC, &all).await;
    for w in &after {
        let p = w.client.positions[DOC];
        assert_ne!(p.epoch, old_epoch, "every client moved to the new epoch");
    }
    for n in &nodes {
        node_has_all(n.addr, DOC, &all).await;
    }
    // A client resuming with an old-epoch position gets a state-vector sync, never a replay.
    let mut late = NativeClient::connect(&urls[1]).await;
    late.subscribe_from(
        DOC,
        Some(chorus_protocol::Position::new(
            old_epoch,
            chorus_protocol::StreamId::new(1, 0),
        )),
        None,
    )
    .await;
    let (_, _, replay) = late.wait_synced(DOC).await;
    assert!(!replay);
    assert!(all.iter().all(|t| late.text(DOC).contains(t.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_clients_resume_on_another_node() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let args = [
        "--redis-url",
        &redis.url(),
        "--snapshot-dir",
        snaps.path().to_str().expect("utf-8"),
    ];
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let victim = ServerProcess::spawn(d1.path(), &args).await;
    let survivor = ServerProcess::spawn(d2.path(), &args).await;
    let clients = clients_on(&[victim.ws_url(), survivor.ws_url()], 2).await;
    let mut writers = edit_concurrently(clients, 20).await;
    let acked: Vec<String> = writers.iter().flat_map(|w| w.acked.clone()).collect();

    victim.kill9().await;

    // The victim's clients (even indices) see the socket drop and reconnect to the survivor,
    // resuming from their last position and resending anything unacknowledged.
    let mut resumed = Vec::new();
    for (i, w) in writers.iter_mut().enumerate() {
        if i % 2 == 1 {
            continue;
        }
        w.client.wait_closed().await;
        let mut c = NativeClient::connect(&survivor.ws_url()).await;
        let position = w.client.positions[DOC];
        let state = w.client.docs.remove(DOC).expect("doc");
        c.docs.insert(DOC.to_string(), state);
        c.positions.insert(DOC.to_string(), position);
        c.subscribe(DOC).await;
        let (_, _, replay) = c.wait_synced(DOC).await;
        assert!(replay, "the last position is in the shared log: replay");
        resend_until_acked(&mut c, DOC).await;
        resumed.push(c);
    }
    let mut refs: Vec<&mut NativeClient> = resumed.iter_mut().collect();
    for (i, w) in writers.iter_mut().enumerate() {
        if i % 2 == 1 {
            refs.push(&mut w.client);
        }
    }
    converge(&mut refs, DOC, &acked).await;
    node_has_all(survivor.addr, DOC, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_expires_when_its_node_dies() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let args = [
        "--redis-url",
        &redis.url(),
        "--snapshot-dir",
        snaps.path().to_str().expect("utf-8"),
        "--presence-ttl",
        "1s",
    ];
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let a = ServerProcess::spawn(d1.path(), &args).await;
    let b = ServerProcess::spawn(d2.path(), &args).await;
    let mut on_a = NativeClient::connect(&a.ws_url()).await;
    let mut on_b = NativeClient::connect(&b.ws_url()).await;
    on_a.subscribe_synced(DOC).await;
    on_b.subscribe_synced(DOC).await;

    send_awareness(
        &mut on_a,
        DOC,
        awareness_update(4242, 1, Some(r#"{"cursor":17}"#)),
    )
    .await;
    wait_awareness(&mut on_b, DOC, 4242, Some("17"), DEADLINE).await;
    send_awareness(
        &mut on_b,
        DOC,
        awareness_update(777, 1, Some(r#"{"cursor":3}"#)),
    )
    .await;
    wait_awareness(&mut on_a, DOC, 777, Some("3"), DEADLINE).await;

    // A client that joins node B later still learns who is on node A.
    let mut late = NativeClient::connect(&b.ws_url()).await;
    late.subscribe(DOC).await;
    wait_awareness(&mut late, DOC, 4242, Some("17"), DEADLINE).await;

    let killed = tokio::time::Instant::now();
    a.kill9().await;
    // Within the TTL plus one heartbeat period (and slack for a loaded machine).
    wait_awareness(&mut on_b, DOC, 4242, None, Duration::from_secs(6)).await;
    eprintln!(
        "presence of a dead node's client removed after {:?}",
        killed.elapsed()
    );
    assert!(
        !matches!(on_b.errors.first(), Some(ServerFrame::Error { .. })),
        "no errors: {:?}",
        on_b.errors
    );
}

// ---- trim-floor gaps (issue 16, item 3) ---------------------------------------------------

fn parse_id(s: &str) -> chorus_protocol::StreamId {
    let (ms, seq) = s.trim().split_once('-').expect("stream id");
    chorus_protocol::StreamId::new(ms.parse().expect("ms"), seq.parse().expect("seq"))
}

/// Node B is cut off from Redis (a proxy drops its connections) while node A writes, lets the
/// entries age past the replay window, and compacts: the log is trimmed past everything B
/// applied. When B is back, its reader cannot read what was trimmed; B must notice, reload
/// from the snapshot A saved, and bring its client everything. B's own later snapshot holds
/// everything too (a snapshot saved past a gap would replace the good one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_while_another_trims_reloads_from_the_snapshot_and_loses_nothing() {
    use chorus_tests::TestServer;
    use chorus_tests::proxy::CutProxy;
    let redis = RedisServer::start().await;
    let proxy = CutProxy::start(format!("127.0.0.1:{}", redis.port).parse().expect("addr")).await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let window = chorus_server::backplane::MIN_SHARED_REPLAY_WINDOW;
    let tune = |c: &mut chorus_server::Config, url: String| {
        c.redis_url = vec![url];
        c.snapshot_dir = Some(snaps.path().to_path_buf());
        c.compact_entries = 5;
        c.replay_window = window;
        c.redis_timeout = Duration::from_secs(1);
    };
    let a = TestServer::start(|c| tune(c, redis.url())).await;
    let b = TestServer::start(|c| tune(c, proxy.redis_url())).await;
    let mut on_a = NativeClient::connect(&a.ws_url()).await;
    let mut on_b = NativeClient::connect(&b.ws_url()).await;
    on_a.subscribe_synced(DOC).await;
    on_b.subscribe_synced(DOC).await;

    let mut tokens = Vec::new();
    let mut write = async |c: &mut NativeClient, i: usize| {
        let token = format!("[{i}]");
        let len = c.text(DOC).chars().count() as u32;
        let seq = c.insert(DOC, len, &token).await;
        tokens.push(token);
        c.wait_acked(seq).await
    };
    write(&mut on_a, 0).await;
    on_b.wait_text(DOC, "[0]").await;
    // The first write made both nodes save a snapshot under the compaction lock; B must not be
    // cut off while it holds it (A could not compact until it expires, 30 s later).
    let lock = format!("chorus:{{{DOC}}}:lock");
    chorus_tests::eventually("no node holds the compaction lock", DEADLINE, || async {
        (redis.cli(&["EXISTS", &lock]).await.trim() == "0").then_some(())
    })
    .await;

    proxy.cut();
    let mut last_b_lacks = chorus_protocol::StreamId::ZERO;
    for i in 1..=5 {
        last_b_lacks = write(&mut on_a, i).await.id;
    }
    // Pacing, not synchronisation: compaction trims only entries older than the window, and
    // entry ids are the append's wall-clock time (Redis runs on this machine's clock).
    let aged = std::time::UNIX_EPOCH
        + Duration::from_millis(last_b_lacks.ms)
        + window
        + Duration::from_secs(1);
    if let Ok(wait) = aged.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    // Every `compact_entries` writes A compacts; write until a compaction trimmed past what B
    // has (the first one after the pause does, unless the machine is slow enough that it
    // started before the entries aged).
    let meta = format!("chorus:{{{DOC}}}:meta");
    let mut i = 6;
    loop {
        write(&mut on_a, i).await;
        i += 1;
        let floor = redis.cli(&["HGET", &meta, "floor"]).await;
        if parse_id(&floor) >= last_b_lacks {
            break;
        }
        assert!(
            i < 60,
            "A never trimmed the log past what B applied (floor {floor})"
        );
    }

    proxy.restore();
    let expected: Vec<String> = tokens.clone();
    converge(&mut [&mut on_a, &mut on_b], DOC, &expected).await;
    node_has_all(b.addr, DOC, &expected).await;

    // B's next snapshot holds everything: A saves and stops, B takes one more write and saves
    // it (at a newer position than A's) when it stops.
    on_a.close().await;
    a.stop().await;
    let token = "[16]".to_string();
    let len = on_b.text(DOC).chars().count() as u32;
    let seq = on_b.insert(DOC, len, &token).await;
    let last = on_b.wait_acked(seq).await;
    on_b.close().await;
    b.stop().await;
    let store = chorus_server::storage::fs::FsSnapshotStore::open(snaps.path().to_path_buf())
        .expect("snapshot store");
    use chorus_server::storage::SnapshotStore;
    let doc = chorus_protocol::DocId::parse(DOC).expect("doc id");
    let snapshot = store.load(&doc).await.expect("load").expect("a snapshot");
    assert!(
        snapshot.position.id >= last.id,
        "B saved the newest snapshot ({} < {})",
        snapshot.position.id,
        last.id
    );
    let d = yrs::Doc::new();
    d.transact_mut()
        .apply_update(yrs::Update::decode_v1(&snapshot.state).expect("decode"))
        .expect("apply");
    use yrs::GetString;
    let text = d.get_or_insert_text("t").get_string(&d.transact());
    for t in expected.iter().chain([&token]) {
        assert!(
            text.contains(t.as_str()),
            "B's snapshot lacks {t}: {text:?}"
        );
    }
}

/// A log trimmed past every snapshot the store holds (here: a snapshot store that lost it)
/// cannot be loaded without a silent gap: the node refuses the document (503) instead of
/// serving it without the trimmed entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_trimmed_past_the_newest_snapshot_is_refused_not_served_with_a_hole() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&redis.url(), snaps.path(), 1, |_| {}).await;
    let mut c = NativeClient::connect(&nodes[0].ws_url()).await;
    c.subscribe_synced(DOC).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let len = c.text(DOC).chars().count() as u32;
        let seq = c.insert(DOC, len, &format!("[{i}]")).await;
        ids.push(c.wait_acked(seq).await.id);
    }
    c.close().await;
    // What a compaction does to the log, without the snapshot it saves first.
    let log = format!("chorus:{{{DOC}}}:log");
    let meta = format!("chorus:{{{DOC}}}:meta");
    redis
        .cli(&["XTRIM", &log, "MINID", &ids[3].to_string()])
        .await;
    redis
        .cli(&["HSET", &meta, "floor", &ids[2].to_string()])
        .await;
    // A node with no snapshot of the document loads it.
    let other = tempfile::tempdir().expect("tempdir");
    let fresh = start_nodes(&redis.url(), other.path(), 1, |_| {}).await;
    let resp = chorus_tests::http::get(fresh[0].addr, &format!("/v1/docs/{DOC}"))
        .await
        .expect("get");
    assert_eq!(
        resp.status, 503,
        "a document whose log lost entries no snapshot holds is unavailable, not served short"
    );
}

/// A POST appends (durably) and then waits for its node to apply the update, for
/// read-your-writes. When the node cannot read the log back, the POST must still answer within
/// its bounded wait: 200 with the position, marked as not applied yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_answers_within_its_deadline_when_its_node_cannot_apply_it() {
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(&redis.url(), snaps.path(), 1, |_| {}).await;
    let addr = nodes[0].addr;
    // A subscriber keeps the document loaded on the node.
    let mut live = NativeClient::connect(&nodes[0].ws_url()).await;
    live.subscribe_synced(DOC).await;
    let seq = live.insert(DOC, 0, "x").await;
    live.wait_acked(seq).await;
    // From now on the node may append (the append script's XADD) but reads nothing back: its
    // reader's XREAD and every re-read's XRANGE are refused.
    let acl = redis
        .cli(&["ACL", "SETUSER", "default", "-xread", "-xrange"])
        .await;
    assert_eq!(acl.trim(), "OK");
    // A blocked XREAD was admitted before the change and would still be served: wait until
    // none is left (each blocks for at most a second; the next one is refused).
    chorus_tests::eventually("no XREAD still blocked", DEADLINE, || async {
        let clients = redis.cli(&["CLIENT", "LIST"]).await;
        (!clients.lines().any(|l| {
            l.contains("cmd=xread")
                && l.split_whitespace()
                    .any(|f| f.starts_with("flags=") && f.contains('b'))
        }))
        .then_some(())
    })
    .await;

    let backend = yrs::Doc::new();
    let text = backend.get_or_insert_text("t");
    yrs::Text::insert(&text, &mut backend.transact_mut(), 0, "posted");
    let update = backend
        .transact()
        .encode_state_as_update_v1(&Default::default());
    // The wait is 5 s; the rest is slack for a loaded machine. The old code waited forever.
    let resp = tokio::time::timeout(
        Duration::from_secs(12),
        chorus_tests::http::post(addr, &format!("/v1/docs/{DOC}/updates"), &update),
    )
    .await
    .expect("the POST answers although its node cannot apply the update")
    .expect("POST");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let json = resp.json();
    assert_eq!(json["applied"], false, "{json}");
    let position: chorus_protocol::Position = json["position"]
        .as_str()
        .expect("position")
        .parse()
        .expect("parse");
    // Durable: the entry is in the log.
    let last = redis
        .cli(&[
            "XREVRANGE",
            &format!("chorus:{{{DOC}}}:log"),
            "+",
            "-",
            "COUNT",
            "1",
        ])
        .await;
    assert!(last.contains(&position.id.to_string()), "{last}");
    let stats = chorus_tests::http::get(addr, "/v1/stats")
        .await
        .expect("stats");
    assert_eq!(stats.json()["writes_applied_late"], 1);
}
