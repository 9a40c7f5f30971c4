//! Benchmark (not a test): what stalled readers cost a node, and what they cost everyone else.
//!
//! cargo build --release -p chorus-server --bin chorus
//! cargo run --release -p chorus-tests --bin bench_slow_readers -- [--mb 40] [--readers 10] [--rate 200]
//!
//! Part 1 (the slow-client issue's target scenario): one writer pushes `--mb` megabytes of
//! ~10 KB map overwrites through one document; one reader keeps up, one (with a 16 KiB
//! receive window, like a slow link) stops reading for the whole run, then resumes. Reports
//! the node's RSS growth, and beside it the growth of a fresh node taking the same writes
//! with nobody stalled (the control: what the write path grows a node by whoever reads) and
//! of that node taking them a second time (warm: without what a first burst sets up once),
//! what the node held for the stalled reader, and its catch-up time and bytes against what it
//! missed.
//! Part 2: `--readers` readers and two writers at `--rate` small updates/s each; fast readers'
//! latency p50/p99 with nobody stalled, then with 20% of the readers stalled.
//! The node runs as a separate release `chorus` process; the generator shares the machine, so
//! compare figures only within one run.

use chorus_protocol::{ClientFrame, ServerFrame};
use chorus_tests::arg;
use chorus_tests::native::NativeClient;
use chorus_tests::{ServerProcess, http};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use yrs::{Map, ReadTxn, Transact};

const VALUE_BYTES: usize = 10 * 1024;
const DOC: &str = "slow";

/// A reader that measures latency from the send time carried in the newest map value.
fn spawn_fast_reader(
    url: String,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    tokio::spawn(async move {
        let mut c = NativeClient::connect(&url).await;
        c.subscribe_synced(DOC).await;
        let mut lat = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(chorus_tests::native::Event::Frame(ServerFrame::Update { .. })) =
                c.next_event(Duration::from_millis(50)).await
                && let Some(v) = c.map_value(DOC, "v")
                && let Some(sent) = v.split('|').next().and_then(|t| t.parse::<u64>().ok())
            {
                let now = epoch.elapsed().as_micros() as u64;
                lat.push(Duration::from_micros(now.saturating_sub(sent)));
            }
        }
        lat
    })
}

/// Writers push `total` bytes of overwrites as fast as the node acks them (window 64 each).
async fn write(url: &str, writers: usize, total: usize, epoch: Instant) -> (usize, Duration) {
    let per_writer = total / writers / VALUE_BYTES;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .expect("connect");
            let (mut tx, mut rx) = ws.split();
            let sub = ClientFrame::Subscribe {
                doc: DOC.into(),
                position: None,
                state_vector: None,
            };
            tx.send(Message::Binary(sub.encode().expect("encode").into()))
                .await
                .expect("send");
            let doc = yrs::Doc::new();
            let map = doc.get_or_insert_map("m");
            let pad = "p".repeat(VALUE_BYTES);
            let window = Arc::new(tokio::sync::Semaphore::new(64));
            let acked = Arc::new(AtomicUsize::new(0));
            let reader = {
                let window = window.clone();
                let acked = acked.clone();
                tokio::spawn(async move {
                    while acked.load(Ordering::Relaxed) < per_writer {
                        match rx.next().await {
                            Some(Ok(Message::Binary(b))) => {
                                if let Ok(ServerFrame::Ack { .. }) = ServerFrame::decode(&b) {
                                    acked.fetch_add(1, Ordering::Relaxed);
                                    window.add_permits(1);
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                })
            };
            let mut bytes = 0;
            for i in 0..per_writer {
                window.acquire().await.expect("permit").forget();
                let before = doc.transact().state_vector();
                let ts = epoch.elapsed().as_micros() as u64;
                map.insert(&mut doc.transact_mut(), "v", format!("{ts}|{w}|{i}|{pad}"));
                let update = doc.transact().encode_state_as_update_v1(&before);
                bytes += update.len();
                let f = ClientFrame::Update {
                    doc: DOC.into(),
                    update,
                    seq: Some(i as u64),
                };
                tx.send(Message::Binary(f.encode().expect("encode").into()))
                    .await
                    .expect("send");
            }
            let _ = reader.await;
            bytes
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.expect("writer");
    }
    (bytes, start.elapsed())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Samples the node's RSS and outbox figures until stopped.
struct Sampler {
    peak_rss: Arc<AtomicU64>,
    peak_largest_outbox: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(addr: std::net::SocketAddr, pid: u32) -> Self {
        let peak_rss = Arc::new(AtomicU64::new(chorus_tests::process_rss_kb(pid)));
        let peak_largest_outbox = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let task = {
            let (peak_rss, peak_outbox, running) = (
                peak_rss.clone(),
                peak_largest_outbox.clone(),
                running.clone(),
            );
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    peak_rss.fetch_max(chorus_tests::process_rss_kb(pid), Ordering::Relaxed);
                    if let Ok(r) = http::get(addr, "/v1/stats").await {
                        let largest = r.json()["outbox"]["largest_pending_bytes"]
                            .as_u64()
                            .unwrap_or(0);
                        peak_outbox.fetch_max(largest, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        Sampler {
            peak_rss,
            peak_largest_outbox,
            running,
            task,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.running.store(false, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.peak_rss.load(Ordering::Relaxed),
            self.peak_largest_outbox.load(Ordering::Relaxed),
        )
    }
}

/// Reads frames until the reader holds `target`; returns (time, bytes received).
async fn catch_up(c: &mut NativeClient, target: &Option<String>) -> (Duration, usize) {
    let start = Instant::now();
    let mut got = 0usize;
    while c.map_value(DOC, "v") != *target {
        match c.next_event(Duration::from_secs(60)).await {
            Some(chorus_tests::native::Event::Frame(f)) => {
                got += f.encode().map(|b| b.len()).unwrap_or(0)
            }
            other => panic!("the stalled reader did not catch up: {other:?}"),
        }
    }
    (start.elapsed(), got)
}

/// Writers at a fixed rate of small updates (map value = send time), for `secs` seconds.
async fn paced_writers(url: &str, writers: usize, rate: usize, secs: u64, epoch: Instant) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = NativeClient::connect(&url).await;
            c.subscribe_synced(DOC).await;
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            let until = Instant::now() + Duration::from_secs(secs);
            let mut last = 0;
            let mut i = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                let ts = epoch.elapsed().as_micros() as u64;
                last = c.set_map(DOC, "v", &format!("{ts}|{w}|{i}")).await;
                i += 1;
                let _ = c.drain_for(Duration::ZERO).await;
            }
            c.wait_acked(last).await;
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

/// A release node that lets a reader stall for the whole run.
async fn spawn_node(dir: &std::path::Path) -> ServerProcess {
    ServerProcess::spawn(
        dir,
        &[
            "--max-messages-per-second",
            "1000000",
            "--slow-client-timeout",
            "600s",
            "--ping-interval",
            "600s",
        ],
    )
    .await
}

/// Part 1's writes on a fresh node with only the fast reader: what the node grows by with
/// nobody stalled (the log's caches, the allocator), so that part 1's growth minus this is
/// what the stalled reader costs. Then the same writes again on that node, once the first
/// burst's checkpoint is done: what a warm node grows by, without what a first burst sets up
/// once (threads, their allocator arenas, caches filling). Returns (fresh, warm) growth.
async fn control_growth(mb: usize, epoch: Instant) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn_node(dir.path()).await;
    let url = server.ws_url();
    let stop = Arc::new(AtomicBool::new(false));
    let fast = spawn_fast_reader(url.clone(), epoch, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut growth = [0; 2];
    for g in &mut growth {
        let before = chorus_tests::process_rss_kb(server.pid());
        let sampler = Sampler::start(server.addr, server.pid());
        write(&url, 1, mb << 20, epoch).await;
        let (peak, _) = sampler.stop().await;
        *g = peak.saturating_sub(before);
        // The embedded log checkpoints within a second of its first pending entry.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = fast.await;
    server.terminate().await;
    (growth[0], growth[1])
}

#[tokio::main]
async fn main() {
    let mb = arg("--mb", 40);
    let readers = arg("--readers", 10);
    let rate = arg("--rate", 200);
    let epoch = Instant::now();
    let (control, warm) = control_growth(mb, epoch).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = spawn_node(dir.path()).await;
    let url = server.ws_url();
    let pid = server.pid();
    println!(
        "bench_slow_readers: node = release `chorus` process (pid {pid}), embedded log, default outbox budget"
    );

    // Part 1: one fast reader, one stalled reader, `mb` MB of 10 KB overwrites.
    let stop = Arc::new(AtomicBool::new(false));
    let fast = spawn_fast_reader(url.clone(), epoch, stop.clone());
    let mut stalled = NativeClient::connect_small_window(&url, 16 * 1024).await;
    stalled.subscribe_synced(DOC).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = chorus_tests::process_rss_kb(pid);
    let cpu_before = chorus_tests::process_cpu_seconds(pid);
    let sampler = Sampler::start(server.addr, pid);
    let (missed, took) = write(&url, 1, mb << 20, epoch).await;
    let (peak_rss, peak_outbox) = sampler.stop().await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = fast.await.expect("fast reader");
    let mut probe = NativeClient::connect(&url).await;
    probe.subscribe_synced(DOC).await;
    let target = probe.map_value(DOC, "v");
    assert!(
        target.is_some() && stalled.map_value(DOC, "v") != target,
        "the stalled reader must be behind for this to measure anything"
    );
    let (catch_time, catch_bytes) = catch_up(&mut stalled, &target).await;
    // The embedded log moves what it wrote into redb at least once a second: its CPU counts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu = chorus_tests::process_cpu_seconds(pid) - cpu_before;
    println!(
        "part 1: 1 writer pushed {:.1} MB of {VALUE_BYTES} B overwrites in {:.2} s; 1 fast reader, 1 stalled reader",
        missed as f64 / 1e6,
        took.as_secs_f64()
    );
    println!(
        "  node CPU for the writes, their checkpoints and the catch-up: {:.0} ms",
        cpu * 1e3
    );
    let growth = peak_rss.saturating_sub(rss_before);
    println!(
        "  node RSS growth            {growth} KB (before {rss_before} KB, peak {peak_rss} KB)"
    );
    println!(
        "  the same writes, nobody stalled (control, a fresh node): {control} KB; the stalled reader's share {} KB",
        growth as i64 - control as i64
    );
    println!("  the same writes again on that node, warm: {warm} KB");
    println!(
        "  held for the stalled reader at most {} B in its outbox while it missed {:.1} MB",
        peak_outbox,
        missed as f64 / 1e6
    );
    println!(
        "  catch-up after resuming    {:?}, {} B received vs {:.1} MB missed ({:.4}x)",
        catch_time,
        catch_bytes,
        missed as f64 / 1e6,
        catch_bytes as f64 / missed.max(1) as f64
    );
    println!(
        "  fast reader latency        p50 {:?} p99 {:?} ({} samples)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        lat.len()
    );

    // Part 2: fast readers' latency with and without 20% of readers stalled.
    let secs = 5;
    let mut results = Vec::new();
    for stalled_count in [0, readers / 5] {
        let mut stalled = Vec::new();
        for _ in 0..stalled_count {
            let mut c = NativeClient::connect_small_window(&url, 16 * 1024).await;
            c.subscribe_synced(DOC).await;
            stalled.push(c);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let fast: Vec<_> = (0..readers - stalled_count)
            .map(|_| spawn_fast_reader(url.clone(), epoch, stop.clone()))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        paced_writers(&url, 2, rate, secs, epoch).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for f in fast {
            lat.extend(f.await.expect("reader"));
        }
        results.push((
            stalled_count,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            lat.len(),
        ));
        drop(stalled);
    }
    println!("part 2: {readers} readers, 2 writers x {rate} updates/s for {secs} s");
    for (n, p50, p99, samples) in results {
        println!(
            "  {n} stalled: fast readers' latency p50 {p50:?} p99 {p99:?} ({samples} samples)"
        );
    }
    server.terminate().await;
}
