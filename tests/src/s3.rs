//! An S3-compatible server for the snapshot-store tests: moto's `moto_server` (PyPI
//! `moto[server]`, installed by scripts/test.sh) on a free port, with one bucket.

use crate::{DEADLINE, eventually, free_port, http};
use std::net::SocketAddr;
use std::process::Stdio;
use tokio::process::{Child, Command};

pub struct S3Server {
    pub addr: SocketAddr,
    _child: Child,
}

impl S3Server {
    /// Starts moto on a free port and creates `bucket`.
    pub async fn start(bucket: &str) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn moto_server (pip install 'moto[server]')");
        eventually("moto_server answers", DEADLINE, || async {
            http::get(addr, "/").await.ok().map(|_| ())
        })
        .await;
        let r = http::request(addr, "PUT", &format!("/{bucket}"), &[], b"")
            .await
            .expect("create bucket");
        assert_eq!(r.status, 200, "bucket created");
        S3Server {
            addr,
            _child: child,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The settings a node needs, as environment variables (`AWS_*`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// The same settings as `object_store` options, for a store built inside the test.
    pub fn options(&self) -> Vec<(String, String)> {
        vec![
            ("aws_endpoint".into(), self.endpoint()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "test".into()),
            ("aws_secret_access_key".into(), "test".into()),
            ("aws_region".into(), "us-east-1".into()),
        ]
    }
}
