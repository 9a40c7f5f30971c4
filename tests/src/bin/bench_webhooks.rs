//! Benchmark (not a test): what a change webhook delivery costs a node, with and without webhooks in one run.
//!
//! cargo build --release -p chorus-server --bin chorus
//! cargo run --release -p chorus-tests --bin bench_webhooks -- [--docs 100] [--rate 5] [--seconds 15] [--rounds 2] [--debounce-ms 2000] [--max-wait-ms 10000]
//!
//! Each round runs two phases on a fresh embedded `chorus` process (release build): without
//! webhooks, then with one `--webhook-url` pointing at a receiver in this process (which checks
//! every signature). In each phase `--docs` documents get `--rate` changes per second each
//! (`POST /v1/docs/{doc}/updates`, the editors pace themselves with an interval) for
//! `--seconds`. Reported per phase kind: the server's CPU (utime + stime) per second, the
//! extra CPU per delivery, deliveries per second, and per delivery the latency from its last
//! change (the `to` position's acknowledgement) and from its first unsent change to arrival.

use chorus_tests::webhook::{Editor, Mode, Receiver, SECRET};
use chorus_tests::{ServerProcess, arg, process_cpu_seconds};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Acknowledgement time of every position, and each position's predecessor in its document.
#[derive(Default)]
struct Acks {
    at: HashMap<String, Instant>,
    /// position → the position acknowledged right after it in the same document.
    next: HashMap<String, String>,
    /// document → its first position.
    first: HashMap<String, String>,
}

struct Phase {
    cpu_s: f64,
    seconds: f64,
    changes: usize,
    deliveries: usize,
    from_last: Vec<Duration>,
    from_first: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run_phase(webhooks: Option<&Receiver>, docs: usize, rate: usize, seconds: u64) -> Phase {
    let data = tempfile::tempdir().expect("tempdir");
    let url = webhooks.map(|r| r.url());
    let debounce = format!("{}ms", arg("--debounce-ms", 2000));
    let max_wait = format!("{}ms", arg("--max-wait-ms", 10_000));
    let mut flags: Vec<&str> = vec!["--max-api-requests-per-second", "0"];
    if let Some(url) = &url {
        flags.extend([
            "--webhook-url",
            url.as_str(),
            "--webhook-secret",
            SECRET,
            "--webhook-debounce",
            debounce.as_str(),
            "--webhook-max-wait",
            max_wait.as_str(),
        ]);
    }
    let node = ServerProcess::spawn(data.path(), &flags).await;
    let addr = node.addr;
    let acks = Arc::new(Mutex::new(Acks::default()));
    let delivered_before = webhooks.map_or(0, |r| r.deliveries().len());
    let cpu_start = process_cpu_seconds(node.pid());
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut editors = Vec::new();
    for d in 0..docs {
        let acks = acks.clone();
        editors.push(tokio::spawn(async move {
            let mut editor = Editor::new(&format!("bench-{d}"));
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate as u64));
            // Spread the documents over the first interval.
            tokio::time::sleep(Duration::from_millis((d * 1000 / rate / docs) as u64)).await;
            let mut previous: Option<String> = None;
            let mut n = 0;
            while Instant::now() < until {
                tick.tick().await;
                let position = editor.edit(addr, "x").await;
                let mut a = acks.lock().unwrap_or_else(|p| p.into_inner());
                a.at.insert(position.clone(), Instant::now());
                match previous.replace(position.clone()) {
                    Some(p) => {
                        a.next.insert(p, position);
                    }
                    None => {
                        a.first.insert(editor.doc_id.clone(), position);
                    }
                }
                n += 1;
            }
            n
        }));
    }
    let mut changes = 0;
    for e in editors {
        changes += e.await.expect("editor");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = process_cpu_seconds(node.pid()) - cpu_start;
    let mut phase = Phase {
        cpu_s,
        seconds: elapsed,
        changes,
        deliveries: 0,
        from_last: Vec::new(),
        from_first: Vec::new(),
    };
    if let Some(r) = webhooks {
        let a = acks.lock().unwrap_or_else(|p| p.into_inner());
        for d in &r.deliveries()[delivered_before..] {
            phase.deliveries += 1;
            if let Some(t) = a.at.get(d.to()) {
                phase.from_last.push(d.at.saturating_duration_since(*t));
            }
            let first = match d.from() {
                Some(from) => a.next.get(from),
                None => a.first.get(d.doc()),
            };
            if let Some(t) = first.and_then(|p| a.at.get(p)) {
                phase.from_first.push(d.at.saturating_duration_since(*t));
            }
        }
    }
    node.terminate().await;
    phase
}

#[tokio::main]
async fn main() {
    let docs = arg("--docs", 100);
    let rate = arg("--rate", 5).max(1);
    let seconds = arg("--seconds", 15) as u64;
    let rounds = arg("--rounds", 2);
    let receiver = Receiver::start(Mode::Ok).await;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let p = run_phase(None, docs, rate, seconds).await;
        println!(
            "round {round} without webhooks: {} changes, server CPU {:.1} ms/s",
            p.changes,
            p.cpu_s * 1000.0 / p.seconds
        );
        off.push(p);
        let p = run_phase(Some(&receiver), docs, rate, seconds).await;
        println!(
            "round {round} with webhooks: {} changes, {} deliveries, server CPU {:.1} ms/s",
            p.changes,
            p.deliveries,
            p.cpu_s * 1000.0 / p.seconds
        );
        on.push(p);
    }
    let rate_of = |ps: &[Phase]| {
        ps.iter().map(|p| p.cpu_s).sum::<f64>() * 1000.0 / ps.iter().map(|p| p.seconds).sum::<f64>()
    };
    let seconds_on: f64 = on.iter().map(|p| p.seconds).sum();
    let deliveries: usize = on.iter().map(|p| p.deliveries).sum();
    let changes_on: usize = on.iter().map(|p| p.changes).sum();
    let (cpu_off, cpu_on) = (rate_of(&off), rate_of(&on));
    let mut from_last: Vec<Duration> = on.iter().flat_map(|p| p.from_last.clone()).collect();
    let mut from_first: Vec<Duration> = on.iter().flat_map(|p| p.from_first.clone()).collect();
    from_last.sort();
    from_first.sort();
    println!();
    println!("{docs} documents x {rate} changes/s, {rounds} rounds of {seconds} s per phase kind");
    println!("server CPU without webhooks: {cpu_off:.1} ms/s");
    println!("server CPU with webhooks:    {cpu_on:.1} ms/s");
    println!(
        "deliveries: {deliveries} ({:.1}/s, {:.1} changes per delivery)",
        deliveries as f64 / seconds_on,
        changes_on as f64 / deliveries.max(1) as f64
    );
    println!(
        "CPU per delivery (with - without): {:.3} ms",
        (cpu_on - cpu_off) * seconds_on / deliveries.max(1) as f64
    );
    println!(
        "last change -> delivery: p50 {:.0} ms, p95 {:.0} ms",
        pct(&from_last, 0.5).as_secs_f64() * 1000.0,
        pct(&from_last, 0.95).as_secs_f64() * 1000.0
    );
    println!(
        "first unsent change -> delivery: p50 {:.0} ms, p95 {:.0} ms",
        pct(&from_first, 0.5).as_secs_f64() * 1000.0,
        pct(&from_first, 0.95).as_secs_f64() * 1000.0
    );
}
