//! nginx in front of test nodes (clients → nginx → nodes): renders the shipped
//! `server/deploy/nginx.conf` for a temp dir and a free port, and runs it as an unprivileged,
//! foreground process (`nginx -p DIR -c DIR/nginx.conf -g 'daemon off; master_process off;'`).

use crate::{DEADLINE, eventually, free_port, http};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

/// The deploy example shipped in the repository.
pub const SHIPPED: &str = include_str!("../../server/deploy/nginx.conf");

/// Rewrites the shipped config for a test: listen address, node list, and the paths and
/// limits that need root in production. Everything else (upstream policy, proxy headers,
/// buffering, timeouts, retries) is the shipped text unchanged. Panics if an anchor is gone,
/// so the test cannot silently drift from the file.
pub fn render(shipped: &str, dir: &Path, port: u16, nodes: &[SocketAddr]) -> String {
    let d = dir.display();
    let mut out = String::new();
    let mut servers_written = false;
    let mut anchors = 0;
    for line in shipped.lines() {
        let t = line.trim();
        let replaced = match t {
            "worker_processes auto;" => Some("worker_processes 1;".to_string()),
            "worker_rlimit_nofile 65536;" => Some(String::new()),
            "pid /run/nginx.pid;" => Some(format!("pid {d}/nginx.pid;")),
            "error_log /var/log/nginx/error.log warn;" => {
                Some(format!("error_log {d}/error.log warn;"))
            }
            "worker_connections 16384;" => Some("worker_connections 1024;".to_string()),
            // Temp files (large bodies) inside the test dir, not /var/lib/nginx.
            "access_log off;" => Some(format!(
                "access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;"
            )),
            "listen 80;" => Some(format!("listen 127.0.0.1:{port};")),
            _ if t.starts_with("server 10.0.0.") => {
                if servers_written {
                    continue; // the shipped example's other nodes
                }
                servers_written = true;
                let fail = t.split_once(' ').map(|x| x.1).unwrap_or_default();
                let fail = fail.split_once(' ').map(|x| x.1).unwrap_or(";");
                Some(
                    nodes
                        .iter()
                        .map(|n| format!("        server {n} {fail}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            }
            _ => None,
        };
        match replaced {
            Some(r) => {
                anchors += 1;
                out.push_str(&r);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    assert!(
        anchors == 8,
        "server/deploy/nginx.conf changed shape: {anchors} of the 8 lines the test rewrites were found"
    );
    out
}

fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nginx")
}

/// A running nginx balancing over `nodes`.
pub struct Nginx {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    pub async fn start(nodes: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = render(SHIPPED, dir.path(), port, nodes);
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            // One process, no workers: nothing is orphaned when a test ends or panics and
            // the process is SIGKILLed (killing a master leaves its workers running).
            .arg("-g")
            .arg("daemon off; master_process off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nginx (install it: apt-get install nginx; scripts/test.sh does)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let n = Nginx { addr, dir, child };
        eventually("nginx answers /healthz from a node", DEADLINE, || async {
            http::get(addr, "/healthz")
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        n
    }

    /// nginx's error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
