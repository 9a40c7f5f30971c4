//! Test harness: real servers (in-process on port 0, or `chorus` processes), real WebSocket
//! clients holding a local yrs document, a stock Yjs client driven over stdin/stdout, and an
//! `eventually` helper so tests wait on events with deadlines instead of sleeping.

pub mod http;
pub mod multinode;
pub mod native;
pub mod nginx;
pub mod proxy;
pub mod redis;
pub mod s3;
pub mod sse;
pub mod stock;
pub mod webhook;

use chorus_server::Config;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A benchmark's numeric flag (`--name N`), or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of process `pid`, in seconds, from `/proc/PID/stat`: the CPU figure every
/// benchmark reports. 0 if the process is gone.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" closing the command name; utime and stime are 14 and 15.
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// VmRSS of process `pid` in KB, from `/proc/PID/status`. 0 if the process is gone.
pub fn process_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Default deadline for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` until it returns `Some`, or fails the test after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A node running inside the test process, on a free port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a node with a fresh data directory; `tune` may change the config first.
    pub async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = Self::start_in(tmp.path(), tune).await;
        s._tmp = Some(tmp);
        s
    }

    /// Starts a node on an existing data directory (to test restarts).
    pub async fn start_in(data_dir: &Path, tune: impl FnOnce(&mut Config)) -> Self {
        init_tracing();
        let mut config = Config::for_data_dir(data_dir);
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(chorus_server::run(config, listener, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            data_dir: data_dir.to_path_buf(),
            stop: Some(stop),
            task: Some(task),
            _tmp: None,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn yjs_base(&self) -> String {
        format!("ws://{}/y", self.addr)
    }

    /// Graceful shutdown; returns once the node has saved everything and stopped.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server run");
        }
    }

    /// Stops the node but keeps its data directory alive for a restart.
    pub async fn stop_keep_data(mut self) -> Option<tempfile::TempDir> {
        self.shutdown().await;
        self._tmp.take()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The `chorus` binary built next to the test executables (`CHORUS_BIN` overrides).
pub fn chorus_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CHORUS_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // Tests: target/<profile>/deps/<test> → target/<profile>/chorus; binaries (benchmarks)
    // sit in target/<profile> themselves.
    let dir = exe.parent().expect("exe dir");
    let bin = if dir.ends_with("deps") {
        dir.parent().expect("target dir").join("chorus")
    } else {
        dir.join("chorus")
    };
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p chorus-server --bin chorus` (the README's test command does)",
        bin.display()
    );
    bin
}

/// A `chorus serve` process, for tests that kill it.
pub struct ServerProcess {
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl ServerProcess {
    pub async fn spawn(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_env(data_dir, extra, &[]).await
    }

    /// Like [`ServerProcess::spawn`], with extra environment variables.
    pub async fn spawn_env(data_dir: &Path, extra: &[&str], env: &[(String, String)]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::spawn_at_env(addr, data_dir, extra, env).await
    }

    /// Like [`ServerProcess::spawn`], on a given address: a killed node restarted where its
    /// clients (stock Yjs clients reconnect to the same URL) expect it.
    pub async fn spawn_at(addr: SocketAddr, data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn_at_env(addr, data_dir, extra, &[]).await
    }

    async fn spawn_at_env(
        addr: SocketAddr,
        data_dir: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let child = tokio::process::Command::new(chorus_bin())
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn chorus");
        let p = ServerProcess { addr, child };
        eventually("server process answers /healthz", DEADLINE, || async {
            http::get(addr, "/healthz")
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        p
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("pid")
    }

    /// SIGKILL: no shutdown path runs.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("kill -9");
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("kill -TERM");
        assert!(status.success());
        self.child.wait().await.expect("wait")
    }
}

/// A port that was free a moment ago (for processes that must be told their port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
