//! Smoke test of the benchmark load generator against an in-process node (both protocols,
//! a few seconds): it connects, syncs, types, and counts deliveries. No timing is asserted.

use chorus_tests::TestServer;

fn run_loadgen(proto: &str, url: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--proto",
            proto,
            "--url",
            url,
            "--pid",
            &std::process::id().to_string(),
            "--scenario",
            "typing",
            "--docs",
            "2",
            "--clients",
            "3",
            "--writers",
            "1",
            "--chars-per-sec",
            "20",
            "--cursor-hz",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0.5",
            "--measure",
            "1.5",
        ])
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("a RESULT line");
    serde_json::from_str(line).expect("RESULT is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_types_and_counts_deliveries() {
    let server = TestServer::start(|_| {}).await;
    for (proto, url) in [
        ("yws", format!("ws://{}/y", server.addr)),
        ("native", server.ws_url()),
    ] {
        let url2 = url.clone();
        let r = tokio::task::spawn_blocking(move || run_loadgen(proto, &url2))
            .await
            .expect("join");
        let step = &r["steps"][0];
        assert!(
            step["delivered_per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{proto}: edits reached the readers: {r}"
        );
        assert!(
            step["p99_ms"].as_f64().is_some(),
            "{proto}: latencies recorded: {r}"
        );
    }
    server.stop().await;
}
