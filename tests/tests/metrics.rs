//! Operator endpoints: `/metrics` series move with real traffic through the whole data flow,
//! and `/readyz` follows the backplane (503 while Redis is down, 200 once it is back).

use chorus_tests::native::NativeClient;
use chorus_tests::redis::RedisServer;
use chorus_tests::{DEADLINE, TestServer, eventually, http};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Scrapes `/metrics` into (series with labels → value), summing nothing.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let resp = http::get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "Prometheus text format"
    );
    String::from_utf8(resp.body)
        .expect("utf-8")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic() {
    let server = TestServer::start(|_| {}).await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    let mut reader = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("m").await;
    reader.subscribe_synced("m").await;
    // The first write creates the document's log (a new epoch: its subscribers are resynced,
    // not sent the entry), so the figures are taken from after it.
    let seq = writer.insert("m", 0, "w").await;
    writer.wait_acked(seq).await;
    reader.wait_text("m", "w").await;
    let before = scrape(server.addr).await;

    for i in 1..6 {
        let seq = writer.insert("m", i, "x").await;
        writer.wait_acked(seq).await;
    }
    reader.wait_text("m", "wxxxxx").await;

    let moved = [
        "chorus_frames_in_total",
        "chorus_bytes_in_total",
        "chorus_frames_out_total",
        "chorus_bytes_out_total",
        "chorus_updates_in_total",
        "chorus_updates_out_total",
        "chorus_append_seconds_count",
        "chorus_fanout_seconds_count",
        "chorus_stream_read_lag_seconds_count",
    ];
    // An ack can reach the client before its connection has counted the append it answers
    // (the count is taken where the append's future completes), so wait for the figures.
    let during = chorus_tests::eventually("the figures move", chorus_tests::DEADLINE, || {
        let before = &before;
        async move {
            let m = scrape(server.addr).await;
            moved
                .iter()
                .all(|s| value(&m, s) >= value(before, s) + 5.0)
                .then_some(m)
        }
    })
    .await;
    assert_eq!(value(&during, "chorus_connections"), 2.0);
    assert_eq!(value(&during, "chorus_hot_documents"), 1.0);
    for series in moved {
        assert!(
            value(&during, series) >= value(&before, series) + 5.0,
            "{series} moved by at least the five updates: before {}, now {}",
            value(&before, series),
            value(&during, series)
        );
    }
    for series in [
        "chorus_outbox_bytes",
        "chorus_outbox_largest_bytes",
        "chorus_outbox_merged_updates_total",
        "chorus_outbox_sheds_total",
    ] {
        assert!(during.contains_key(series), "{series} is exported");
    }

    // The embedded log moves its write-ahead segment into redb about a second after the
    // first write.
    let checkpoints = r#"chorus_log_checkpoints_total{outcome="ok"}"#;
    eventually(
        "the write-ahead segment is checkpointed",
        DEADLINE,
        || async {
            let m = scrape(server.addr).await;
            (value(&m, checkpoints) > value(&before, checkpoints)).then_some(())
        },
    )
    .await;
    let m = scrape(server.addr).await;
    assert!(
        value(&m, "chorus_log_checkpoint_seconds_count") >= 1.0,
        "checkpoint time is recorded"
    );

    reader.close().await;
    writer.close().await;
    let after = eventually("connections drop to 0", DEADLINE, || async {
        let m = scrape(server.addr).await;
        (value(&m, "chorus_connections") == 0.0).then_some(m)
    })
    .await;
    let closes: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("chorus_closes_total{"))
        .map(|(_, v)| v)
        .sum();
    assert!(closes >= 2.0, "closes counted by code: {after:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_backplane() {
    let embedded = TestServer::start(|_| {}).await;
    let r = http::get(embedded.addr, "/readyz").await.expect("readyz");
    assert_eq!(r.status, 200, "an embedded log is ready once open");
    embedded.stop().await;

    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let server = TestServer::start(|c| c.redis_url = vec![url]).await;
    let status = |addr| async move { http::get(addr, "/readyz").await.map(|r| r.status).ok() };
    eventually("ready with Redis up", DEADLINE, || async {
        (status(server.addr).await == Some(200)).then_some(())
    })
    .await;

    redis.kill9().await;
    eventually("503 with Redis down", DEADLINE, || async {
        (status(server.addr).await == Some(503)).then_some(())
    })
    .await;
    let m = scrape(server.addr).await;
    assert!(
        m.iter()
            .any(|(k, v)| k.starts_with("chorus_redis_errors_total") && *v > 0.0),
        "failed Redis commands are counted"
    );

    redis.restart().await;
    eventually("ready again after Redis restarted", DEADLINE, || async {
        (status(server.addr).await == Some(200)).then_some(())
    })
    .await;
    server.stop().await;
}
