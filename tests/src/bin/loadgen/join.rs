//! Join storm (outside the data flow: it plays stock clients at steps 1 and 3): many clients
//! join one large document at once, each with sync step 1 and an empty state vector.
//!
//! The document is `--mb` × 10 inserts of 100,000 characters into one text (about `--mb` MB
//! encoded, the shape of `tests/js/bench-joinstorm.mjs`). It is seeded over the stock protocol
//! of the server under test, one insert per update (not every server takes a 20 MB frame),
//! and a second client waits until it has all of it. That client stays connected through the
//! storm, so every server holds the document hot (the reference server unloads a document
//! whose last client left). Once the server is quiet, its peak RSS is reset
//! (`/proc/PID/clear_refs`), and `--clients` joiners connect at once; each is timed until it
//! has received the whole document's bytes. Memory is the growth of the peak (VmHWM) over the
//! RSS before the storm.

use super::{Args, Got, Proc, Target, emit, rawjoin, upper_clocks};
use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, Text, Transact, Update};

/// The seeding client's id: the document's every item carries it.
const AUTHOR: u64 = 7;
const CHUNK_CHARS: usize = 100_000;

/// The document as the updates that built it, its encoded size and its length in characters.
/// The last update is one character: see [`seed`].
fn build(mb: usize) -> (Vec<Vec<u8>>, usize, u32) {
    let doc = yrs::Doc::with_client_id(AUTHOR);
    let text = doc.get_or_insert_text("t");
    let chunk = "abcdefghij".repeat(CHUNK_CHARS / 10);
    let mut updates = Vec::with_capacity(mb * 10);
    for _ in 0..mb * 10 {
        let mut txn = doc.transact_mut();
        let at = text.len(&txn);
        text.insert(&mut txn, at, &chunk);
        updates.push(txn.encode_update_v1());
    }
    {
        let mut txn = doc.transact_mut();
        let at = text.len(&txn);
        text.insert(&mut txn, at, "!");
        updates.push(txn.encode_update_v1());
    }
    let encoded = doc
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default())
        .len();
    (updates, encoded, (mb * 10 * CHUNK_CHARS) as u32 + 1)
}

/// Sends the document as its updates and returns a second client once it has all of it.
/// The last update (one character) goes only after that client has the rest: a server that
/// keeps its whole-document answer encoded (Chorus does) has the one it made for that client
/// outdated, so the storm pays for encoding the document once, as it would after any edit.
async fn seed(
    target: &Target,
    doc: &str,
    updates: &[Vec<u8>],
    chars: u32,
) -> anyhow::Result<super::Ws> {
    let (last, body) = updates.split_last().context("no updates")?;
    let mut w = target.open(doc, 4).await?;
    super::until_synced(target, &mut w, doc).await?;
    for u in body {
        w.feed(target.update(doc, u)).await?;
    }
    w.flush().await?;
    let mut r = target.open(doc, 5).await?;
    let have = read_until(target, &mut r, doc, 0, chars - 1).await?;
    w.send(target.update(doc, last)).await?;
    read_until(target, &mut r, doc, have, chars).await?;
    // The writer is done; the holder stays.
    drop(w);
    Ok(r)
}

/// Reads `r` until the author's clock in what it received reaches `chars`.
async fn read_until(
    target: &Target,
    r: &mut super::Ws,
    doc: &str,
    mut have: u32,
    chars: u32,
) -> anyhow::Result<u32> {
    let mut scratch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while have < chars {
        let msg = tokio::time::timeout_at(deadline, r.next())
            .await
            .context("seed: the document did not arrive within 180 s")?
            .context("seed: closed")??;
        let Message::Binary(b) = msg else { continue };
        let got = target.parse(&b, &mut scratch);
        if let Got::Update(u) | Got::Synced(u) = &got
            && let Ok(u) = Update::decode_v1(u)
        {
            for (client, clock) in upper_clocks(&u) {
                if client == AUTHOR {
                    have = have.max(clock);
                }
            }
        }
        target.answer(r, doc, &got).await?;
    }
    Ok(have)
}

/// Waits until the server has used under 20 ms of CPU in each of 2 consecutive seconds (at
/// most `limit`): servers that persist behind their answers finish before the storm.
async fn settle(server: Proc, limit: Duration) {
    let end = Instant::now() + limit;
    let (mut quiet, mut last) = (0, server.cpu());
    while quiet < 2 && Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = server.cpu();
        quiet = if now - last < 0.02 { quiet + 1 } else { 0 };
        last = now;
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub async fn join(target: Arc<Target>, a: &Args, server: Proc) -> anyhow::Result<()> {
    let mb = a.n("mb", 20.0) as usize;
    let clients = a.n("clients", 150.0) as usize;
    let label = a.s("label", "server");
    let doc = a.s("doc", "storm");
    let out = a.s("out", "");
    let deadline = Duration::from_secs_f64(a.n("deadline", 180.0));
    let (updates, doc_bytes, chars) = build(mb);
    let holder = seed(&target, &doc, &updates, chars).await?;
    drop(updates);
    // The holder is read through the storm, so nothing piles up for it.
    let (_holder_sink, mut holder_stream) = holder.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = holder_stream.next().await {} });
    settle(server, Duration::from_secs_f64(a.n("settle", 30.0))).await;
    // Peak RSS from here on: the seeding's own peak must not count as the storm's.
    let reset = std::fs::write(format!("/proc/{}/clear_refs", server.pid), "5").is_ok();
    let rss0 = server.rss_kb();
    let cpu0 = server.cpu();
    // The whole document's bytes, less what encoders may legitimately differ by (item
    // boundaries: a few bytes per insert).
    let want = doc_bytes - doc_bytes / 100;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (target, doc) = (target.clone(), doc.clone());
            let ip = 10 + (i % 200) as u8;
            tokio::spawn(async move {
                let joined = rawjoin::join(&target, &doc, ip, t0, want, i == 0);
                tokio::time::timeout(deadline, joined).await
            })
        })
        .collect();
    let (mut times, mut failed, mut sockets, mut first) = (Vec::new(), 0, Vec::new(), None);
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(joined))) => {
                times.push(joined.took.as_millis() as u32);
                sockets.push(joined.stream);
                if !joined.kept.is_empty() {
                    first = Some(joined.kept);
                }
            }
            Ok(Ok(Err(e))) => {
                failed += 1;
                eprintln!("joiner failed: {e:#}");
            }
            _ => failed += 1,
        }
    }
    let hwm = status_kb(server.pid, "VmHWM:");
    let server_cpu_s = server.cpu() - cpu0;
    drop(sockets);
    drain.abort();
    // The first joiner's content must really be the document, not just as many bytes.
    let whole = first
        .map(|messages| content(&target, &messages))
        .and_then(|p| yrs::merge_updates_v1(p.iter().map(Vec::as_slice)).ok())
        .and_then(|u| Update::decode_v1(&u).ok())
        .is_some_and(|u| {
            upper_clocks(&u)
                .iter()
                .any(|&(c, k)| c == AUTHOR && k >= chars)
        });
    let storm = Storm {
        clients,
        doc_bytes,
        times,
        failed,
        whole,
        reset,
        rss0,
        hwm,
        server_cpu_s,
    };
    storm.report(&out, &label);
    Ok(())
}

/// The updates in whole protocol messages.
fn content(target: &Target, messages: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut scratch = Vec::new();
    messages
        .iter()
        .filter_map(|m| match target.parse(m, &mut scratch) {
            Got::Update(u) | Got::Synced(u) => Some(u.to_vec()),
            _ => None,
        })
        .collect()
}

/// What one storm measured.
struct Storm {
    clients: usize,
    doc_bytes: usize,
    /// Milliseconds to the whole document, per joiner that got it.
    times: Vec<u32>,
    failed: usize,
    /// The first joiner's content was checked to be the whole document.
    whole: bool,
    /// The server's peak RSS was reset before the storm.
    reset: bool,
    rss0: u64,
    hwm: u64,
    /// Server CPU (user + system) from the first connect until the last joiner was done.
    server_cpu_s: f64,
}

impl Storm {
    fn report(mut self, out: &str, label: &str) {
        self.times.sort_unstable();
        let times = &self.times;
        let at = |p: f64| {
            (!times.is_empty()).then(|| times[((times.len() - 1) as f64 * p).round() as usize])
        };
        let (clients, doc_bytes, failed, whole) =
            (self.clients, self.doc_bytes, self.failed, self.whole);
        let growth_mb = self.hwm.saturating_sub(self.rss0) as f64 / 1024.0;
        let growth_x = growth_mb * 1024.0 * 1024.0 / doc_bytes as f64;
        println!(
            "{label}: {clients} joiners, {doc_bytes} B document: p50 {:?} ms, p99 {:?} ms, max \
             {:?} ms, {failed} failed, whole={whole}; RSS {} MB before, peak +{growth_mb:.0} MB \
             ({growth_x:.2}× the document), server CPU {:.2} s{}",
            at(0.5),
            at(0.99),
            at(1.0),
            self.rss0 / 1024,
            self.server_cpu_s,
            if self.reset {
                ""
            } else {
                " (peak not reset: includes the seeding)"
            }
        );
        emit(
            out,
            serde_json::json!({
                "scenario": "join", "server": label, "joiners": clients, "doc_bytes": doc_bytes,
                "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0), "failed": failed,
                "whole": whole, "peak_reset": self.reset, "rss_before_kb": self.rss0,
                "hwm_kb": self.hwm, "rss_growth_mb": growth_mb, "server_cpu_s": self.server_cpu_s, "growth_per_doc": growth_x,
            }),
        );
    }
}
