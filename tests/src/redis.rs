//! Real `redis-server` processes for the multi-node tests: one standalone server per test (on a
//! free port, AOF on, killable and restartable on the same port with its data), or a
//! three-master Redis Cluster (which can grow a master).

use crate::{DEADLINE, eventually, free_port};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::process::{Child, Command};

/// Runs `redis-cli -p PORT ARGS...` and returns its stdout.
pub async fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Redis Cluster's hash slot of a hash tag (CRC16-XMODEM mod 16384), to pick document names.
pub fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The slot ranges the master on `port` serves (its `myself` line of CLUSTER NODES).
pub async fn own_slots(port: u16) -> Vec<(u16, u16)> {
    let nodes = cli(port, &["CLUSTER", "NODES"])
        .await
        .expect("cluster nodes");
    let line = nodes
        .lines()
        .find(|l| l.contains("myself"))
        .expect("myself line");
    line.split_whitespace()
        .skip(8)
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => r.parse().ok().map(|s| (s, s)),
        })
        .collect()
}

fn spawn_redis(port: u16, dir: &std::path::Path, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--dir")
        .arg(dir)
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("yes")
        // Every acknowledged write is on disk before Redis answers: the restart test kills
        // Redis with SIGKILL and still expects every acked update.
        .arg("--appendfsync")
        .arg("always")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn redis-server (install it: apt-get install redis-server)")
}

async fn wait_ping(port: u16) {
    eventually("redis-server answers PING", DEADLINE, || async {
        cli(port, &["PING"])
            .await
            .filter(|s| s.trim() == "PONG")
            .map(|_| ())
    })
    .await;
}

/// One standalone Redis.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = spawn_redis(port, dir.path(), &[]);
        wait_ping(port).await;
        RedisServer {
            port,
            dir,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown save runs (AOF with `appendfsync always` keeps every acked write).
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill redis");
        }
    }

    /// Starts it again on the same port with the same data directory.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.child = Some(spawn_redis(self.port, self.dir.path(), &[]));
        wait_ping(self.port).await;
    }

    pub async fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args).await.expect("redis-cli")
    }

    /// Total calls of each command since the server started (`INFO commandstats`).
    pub async fn command_calls(&self) -> std::collections::HashMap<String, u64> {
        parse_commandstats(&self.cli(&["INFO", "commandstats"]).await)
    }
}

pub fn parse_commandstats(info: &str) -> std::collections::HashMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55535 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

fn spawn_cluster_redis(port: u16, dir: &std::path::Path) -> Child {
    let conf: PathBuf = dir.join("nodes.conf");
    spawn_redis(
        port,
        dir,
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            conf.to_str().expect("utf-8 path"),
            "--cluster-node-timeout",
            "2000",
        ],
    )
}

/// A three-master Redis Cluster (no replicas), created with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
    _children: Vec<Child>,
}

impl RedisCluster {
    pub async fn start() -> Self {
        let mut ports = Vec::new();
        let mut dirs = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = cluster_port();
            children.push(spawn_cluster_redis(port, dir.path()));
            wait_ping(port).await;
            ports.push(port);
            dirs.push(dir);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        cli(ports[0], &args)
            .await
            .expect("redis-cli --cluster create");
        for &p in &ports {
            eventually(
                "cluster_state:ok on every master",
                DEADLINE,
                || async move {
                    cli(p, &["CLUSTER", "INFO"])
                        .await
                        .filter(|s| s.contains("cluster_state:ok"))
                        .map(|_| ())
                },
            )
            .await;
        }
        RedisCluster {
            ports,
            _dirs: dirs,
            _children: children,
        }
    }

    /// Starts one more master and joins it to the cluster, holding no slots until some are
    /// moved to it; returns its port. Every master knows it when this returns.
    pub async fn add_master(&mut self) -> u16 {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = cluster_port();
        self._children.push(spawn_cluster_redis(port, dir.path()));
        self._dirs.push(dir);
        wait_ping(port).await;
        let new = format!("127.0.0.1:{port}");
        let existing = format!("127.0.0.1:{}", self.ports[0]);
        cli(self.ports[0], &["--cluster", "add-node", &new, &existing])
            .await
            .expect("redis-cli --cluster add-node");
        self.ports.push(port);
        let masters = self.ports.len();
        for &p in &self.ports {
            let new = new.clone();
            eventually("every master knows the new one", DEADLINE, || {
                let new = new.clone();
                async move {
                    let nodes = cli(p, &["CLUSTER", "NODES"]).await?;
                    (nodes.lines().filter(|l| l.contains("master")).count() == masters
                        && nodes.contains(&new))
                    .then_some(())
                }
            })
            .await;
        }
        port
    }

    /// The seeds as one `--redis-url` value.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}
