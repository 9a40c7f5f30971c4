//! Benchmark (not a test): the Redis backplane's costs, on a `redis-server` it starts itself.
//!
//! cargo build --release -p chorus-server --bin chorus
//! cargo run --release -p chorus-tests --bin bench_redis -- [--updates 2000] [--load-clients 16] [--load-updates 500] [--kills 5]
//!
//! 1. Latency: one writer on node A sends an update and waits until an observer on node A
//!    (same node) and one on node B (cross node) received it; repeated `--updates` times.
//!    Reports p50/p99 of both and of the extra cross-node latency.
//! 2. Redis commands per client update under load: `--load-clients` clients spread over the two
//!    nodes and 8 documents, each sending `--load-updates` updates without waiting for acks;
//!    the `INFO commandstats` delta divided by the number of updates.
//! 3. Resume after a node is killed: a client on a `chorus` process that gets SIGKILL, measured
//!    from the kill until it is connected to another node and has its `synced` (by replay).

use chorus_protocol::ServerFrame;
use chorus_tests::native::{Event, NativeClient};
use chorus_tests::redis::RedisServer;
use chorus_tests::{ServerProcess, TestServer};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use chorus_tests::arg;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Reads a client's socket and reports the arrival time of every `update` frame.
fn observe(mut c: NativeClient) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match c.next_event(Duration::from_secs(30)).await {
                // The first write creates the document's log, whose new epoch resyncs every
                // subscriber: that update arrives in a `synced` frame.
                Some(Event::Frame(ServerFrame::Update { .. } | ServerFrame::Synced { .. })) => {
                    if tx.send(Instant::now()).await.is_err() {
                        return;
                    }
                }
                Some(Event::Frame(_)) => {}
                _ => return,
            }
        }
    });
    rx
}

async fn latency(a: &TestServer, b: &TestServer, updates: usize) {
    let doc = "lat";
    let mut writer = NativeClient::connect(&a.ws_url()).await;
    writer.subscribe_synced(doc).await;
    let mut same = NativeClient::connect(&a.ws_url()).await;
    same.subscribe_synced(doc).await;
    let mut cross = NativeClient::connect(&b.ws_url()).await;
    cross.subscribe_synced(doc).await;
    let mut same_rx = observe(same);
    let mut cross_rx = observe(cross);
    let (mut s, mut c, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..updates {
        let t0 = Instant::now();
        let seq = writer.insert(doc, i as u32, "x").await;
        let t_same = same_rx.recv().await.expect("same-node observer");
        let t_cross = cross_rx.recv().await.expect("cross-node observer");
        writer.wait_acked(seq).await;
        let (ds, dc) = (t_same - t0, t_cross - t0);
        s.push(ds);
        c.push(dc);
        extra.push(dc.saturating_sub(ds));
    }
    for v in [&mut s, &mut c, &mut extra] {
        v.sort();
    }
    println!("1. delivery latency, writer on node A, {updates} sequential updates");
    println!(
        "   same node (A->A):   p50 {}  p99 {}",
        ms(pct(&s, 0.5)),
        ms(pct(&s, 0.99))
    );
    println!(
        "   cross node (A->B):  p50 {}  p99 {}",
        ms(pct(&c, 0.5)),
        ms(pct(&c, 0.99))
    );
    println!(
        "   extra cross-node:   p50 {}  p99 {}",
        ms(pct(&extra, 0.5)),
        ms(pct(&extra, 0.99))
    );
}

async fn commands_per_update(
    redis: &RedisServer,
    nodes: &[&TestServer],
    clients: usize,
    per_client: usize,
) {
    let mut cs = Vec::new();
    for i in 0..clients {
        let doc = format!("load-{}", i % 8);
        let mut c = NativeClient::connect(&nodes[i % nodes.len()].ws_url()).await;
        c.subscribe_synced(&doc).await;
        cs.push((doc, c));
    }
    let before = redis.command_calls().await;
    let sent_before = chorus_server::backplane::redis::commands_sent();
    let started = Instant::now();
    let tasks: Vec<_> = cs
        .into_iter()
        .map(|(doc, mut c)| {
            tokio::spawn(async move {
                let mut last = 0;
                for i in 0..per_client {
                    last = c.insert(&doc, i as u32 % 4, "y").await;
                }
                c.wait_acked(last).await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("load client");
    }
    let elapsed = started.elapsed();
    let sent = chorus_server::backplane::redis::commands_sent() - sent_before;
    let after = redis.command_calls().await;
    let total_updates = (clients * per_client) as f64;
    let mut delta: Vec<(String, u64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(k, v)| *v > 0 && k != "info")
        .collect();
    delta.sort_by_key(|(_, v)| std::cmp::Reverse(*v));
    let sum: u64 = delta.iter().map(|(_, v)| v).sum();
    println!(
        "2. Redis commands per client update under load: {clients} clients on {} nodes, 8 documents, {per_client} updates each, no waiting for acks",
        nodes.len()
    );
    println!(
        "   {} updates in {:.2} s ({:.0} updates/s)",
        total_updates,
        elapsed.as_secs_f64(),
        total_updates / elapsed.as_secs_f64()
    );
    println!(
        "   commands the nodes sent (an EVAL counts once): {:.4} per update ({sent} in total)",
        sent as f64 / total_updates
    );
    println!(
        "   commands Redis executed (INFO commandstats, Lua-internal calls included): {:.3} per update ({sum} in total)",
        sum as f64 / total_updates
    );
    let breakdown: Vec<String> = delta
        .iter()
        .map(|(k, v)| format!("{k} {v} ({:.3}/update)", *v as f64 / total_updates))
        .collect();
    println!("   by command: {}", breakdown.join(", "));
}

async fn resume_after_kill(redis: &RedisServer, kills: usize) {
    let snaps = tempfile::tempdir().expect("tempdir");
    let args = [
        "--redis-url".to_string(),
        redis.url(),
        "--snapshot-dir".to_string(),
        snaps.path().display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = tempfile::tempdir().expect("tempdir");
    let survivor = ServerProcess::spawn(d.path(), &args).await;
    let mut times = Vec::new();
    for k in 0..kills {
        let dv = tempfile::tempdir().expect("tempdir");
        let victim = ServerProcess::spawn(dv.path(), &args).await;
        let doc = format!("resume-{k}");
        let mut c = NativeClient::connect(&victim.ws_url()).await;
        c.subscribe_synced(&doc).await;
        let mut last = 0;
        for i in 0..20 {
            last = c.insert(&doc, i, "z").await;
        }
        c.wait_acked(last).await;
        let killed = Instant::now();
        victim.kill9().await;
        c.wait_closed().await;
        let mut back = NativeClient::connect(&survivor.ws_url()).await;
        back.docs
            .insert(doc.clone(), c.docs.remove(&doc).expect("doc"));
        back.positions.insert(doc.clone(), c.positions[&doc]);
        back.subscribe(&doc).await;
        let (_, _, replay) = back.wait_synced(&doc).await;
        let t = killed.elapsed();
        assert!(replay, "resume by replay");
        times.push(t);
    }
    times.sort();
    println!(
        "3. resume on another node after SIGKILL ({kills} kills): kill -> socket closed -> connect to a live node -> synced (replay)"
    );
    println!(
        "   p50 {}  max {}",
        ms(pct(&times, 0.5)),
        ms(*times.last().unwrap_or(&Duration::ZERO))
    );
    survivor.terminate().await;
}

#[tokio::main]
async fn main() {
    let updates = arg("--updates", 2000);
    let load_clients = arg("--load-clients", 16);
    let load_updates = arg("--load-updates", 500);
    let kills = arg("--kills", 5);
    let redis = RedisServer::start().await;
    let snaps = tempfile::tempdir().expect("tempdir");
    let tune = |c: &mut chorus_server::Config| {
        c.redis_url = vec![redis.url()];
        c.snapshot_dir = Some(snaps.path().to_path_buf());
        // The latency run sends as fast as acks come back (well over the default 500 messages
        // per second per connection once a round trip is under 2 ms); a refused update would
        // never reach the observers.
        c.max_messages_per_second = 1_000_000;
    };
    let a = TestServer::start(tune).await;
    let b = TestServer::start(tune).await;
    println!(
        "bench_redis: 2 in-process nodes on one redis-server (AOF, appendfsync always) on loopback"
    );
    latency(&a, &b, updates).await;
    commands_per_update(&redis, &[&a, &b], load_clients, load_updates).await;
    resume_after_kill(&redis, kills).await;
    a.stop().await;
    b.stop().await;
}
