//! Benchmark (not a test): updates/s through one document with N subscribers, on a node
//! started in-process with the embedded (fsynced) log.
//!
//! cargo run --release -p chorus-tests --bin bench_fanout -- [--updates 20000] [--subscribers 10] [--window 256]
//!
//! One writer types single characters (real ~30-byte yrs updates) with up to `window`
//! updates unacknowledged; every subscriber reads until it has the writer's last position.
//! Reports updates/s (appended, acked and delivered to every subscriber), deliveries/s and
//! the writer's ack latency.

use chorus_protocol::{ClientFrame, Position, ServerFrame};
use chorus_tests::arg;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use yrs::{ReadTxn, Text, Transact};

fn frame(f: &ClientFrame) -> Message {
    Message::Binary(f.encode().expect("encode").into())
}

#[tokio::main]
async fn main() {
    let updates = arg("--updates", 20_000);
    let subscribers = arg("--subscribers", 10);
    let window = arg("--window", 256);
    let server = chorus_tests::TestServer::start(|c| {
        c.compact_entries = 100_000;
        c.compact_bytes = 1 << 30;
    })
    .await;
    let url = server.ws_url();
    let doc = "bench";

    // Subscribers: read until they hold the final position, counting frames and bytes.
    let (final_tx, final_rx) = watch::channel::<Option<Position>>(None);
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect");
        ws.send(frame(&ClientFrame::Subscribe {
            doc: doc.into(),
            position: None,
            state_vector: None,
        }))
        .await
        .expect("subscribe");
        loop {
            if let Some(Ok(Message::Binary(b))) = ws.next().await
                && matches!(ServerFrame::decode(&b), Ok(ServerFrame::Synced { .. }))
            {
                break;
            }
        }
        let mut final_rx = final_rx.clone();
        readers.push(tokio::spawn(async move {
            let (mut frames, mut bytes) = (0usize, 0usize);
            let mut last: Option<Position> = None;
            loop {
                let target = *final_rx.borrow_and_update();
                if let (Some(t), Some(l)) = (target, last)
                    && l.id >= t.id {
                        return (frames, bytes, Instant::now());
                    }
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Binary(b))) => {
                            frames += 1;
                            bytes += b.len();
                            if let Ok(ServerFrame::Update { position, .. }) = ServerFrame::decode(&b) {
                                last = Some(position);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => panic!("subscriber socket ended early"),
                    },
                    _ = final_rx.changed() => {}
                }
            }
        }));
    }

    // Writer: pre-generate the updates so the clock measures the server, not yrs on our side.
    let ydoc = yrs::Doc::new();
    let text = ydoc.get_or_insert_text("t");
    let mut payloads = Vec::with_capacity(updates);
    for i in 0..updates {
        let before = ydoc.transact().state_vector();
        text.insert(&mut ydoc.transact_mut(), i as u32, "x");
        payloads.push(ydoc.transact().encode_state_as_update_v1(&before));
    }
    let avg_update = payloads.iter().map(Vec::len).sum::<usize>() / updates.max(1);
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    tx.send(frame(&ClientFrame::Subscribe {
        doc: doc.into(),
        position: None,
        state_vector: None,
    }))
    .await
    .expect("subscribe");
    let permits = Arc::new(Semaphore::new(window));
    let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; updates + 1]));
    let acks = {
        let permits = permits.clone();
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(updates);
            let mut last = None;
            while latencies.len() < updates {
                match rx.next().await {
                    Some(Ok(Message::Binary(b))) => match ServerFrame::decode(&b) {
                        Ok(ServerFrame::Ack {
                            seq: Some(seq),
                            position,
                            ..
                        }) => {
                            if let Some(t) = sent_at.lock().expect("lock")[seq as usize] {
                                latencies.push(t.elapsed());
                            }
                            last = Some(position);
                            permits.add_permits(1);
                        }
                        Ok(ServerFrame::Error { message, .. }) => panic!("server error: {message}"),
                        _ => {}
                    },
                    Some(Ok(_)) => {}
                    _ => panic!("writer socket ended early"),
                }
            }
            (latencies, last.expect("acks"))
        })
    };
    let start = Instant::now();
    for (i, update) in payloads.into_iter().enumerate() {
        permits.acquire().await.expect("permit").forget();
        let seq = (i + 1) as u64;
        sent_at.lock().expect("lock")[seq as usize] = Some(Instant::now());
        tx.send(frame(&ClientFrame::Update {
            doc: doc.into(),
            update,
            seq: Some(seq),
        }))
        .await
        .expect("send");
    }
    let (mut latencies, last) = acks.await.expect("acks");
    let acked = start.elapsed();
    final_tx.send(Some(last)).expect("final");
    let mut frames = 0;
    let mut bytes = 0;
    let mut done = start;
    for r in readers {
        let (f, b, at) = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .expect("subscribers finish")
            .expect("reader");
        frames += f;
        bytes += b;
        done = done.max(at);
    }
    let all = done.duration_since(start);
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "bench_fanout: 1 document, 1 writer (window {window}), {subscribers} subscribers, embedded fsynced log"
    );
    println!("  updates                 {updates} (avg {avg_update} B)");
    println!(
        "  all acked after         {:.3} s  -> {:.0} updates/s durable",
        acked.as_secs_f64(),
        updates as f64 / acked.as_secs_f64()
    );
    println!(
        "  all delivered after     {:.3} s  -> {:.0} updates/s through the document",
        all.as_secs_f64(),
        updates as f64 / all.as_secs_f64()
    );
    println!(
        "  deliveries              {} updates to {subscribers} subscribers in {frames} frames ({:.1} updates/frame after merging), {:.0} deliveries/s",
        updates * subscribers,
        (updates * subscribers) as f64 / frames.max(1) as f64,
        (updates * subscribers) as f64 / all.as_secs_f64()
    );
    println!("  bytes to subscribers    {bytes}");
    println!(
        "  ack latency             p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    server.stop().await;
}
