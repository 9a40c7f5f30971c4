//! A stock Yjs client (npm `yjs` + `y-websocket`) in a Node child process, driven by
//! newline-delimited JSON over stdin/stdout (see tests/js/ystock.mjs).

use crate::DEADLINE;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

pub struct StockClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    /// Events seen so far, in order.
    pub events: Vec<Value>,
}

pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

impl StockClient {
    /// Starts a client on `{base}/{doc}`, e.g. base `ws://127.0.0.1:8080/y`.
    pub async fn spawn(base: &str, doc: &str) -> Self {
        let dir = js_dir();
        assert!(
            dir.join("node_modules").join("y-websocket").exists(),
            "npm packages missing in {}: run the README's test command (it runs `npm ci` there)",
            dir.display()
        );
        let mut child = tokio::process::Command::new("node")
            .arg("ystock.mjs")
            .arg(base)
            .arg(doc)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node (is Node.js installed?)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel(4096);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send(v).await.is_err() {
                    break;
                }
            }
        });
        let mut c = StockClient {
            child,
            stdin,
            lines,
            events: Vec::new(),
        };
        c.wait_event(|e| e["event"] == "ready").await;
        c
    }

    async fn next_line(&mut self) -> Value {
        match tokio::time::timeout(DEADLINE, self.lines.recv()).await {
            Ok(Some(v)) => v,
            Ok(None) => panic!("stock client exited; events so far: {:?}", self.events),
            Err(_) => panic!(
                "stock client said nothing for {DEADLINE:?}; events so far: {:?}",
                self.events
            ),
        }
    }

    /// Sends a command and returns its reply (events arriving meanwhile are recorded).
    pub async fn cmd(&mut self, cmd: Value) -> Value {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to node");
        self.stdin.flush().await.expect("flush");
        loop {
            let v = self.next_line().await;
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Waits for an event matching `pred`, including ones already seen.
    pub async fn wait_event(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(e) = self.events.iter().find(|e| pred(e)) {
            return e.clone();
        }
        loop {
            let v = self.next_line().await;
            let hit = v.get("event").is_some() && pred(&v);
            self.events.push(v.clone());
            if hit {
                return v;
            }
        }
    }

    pub async fn insert(&mut self, index: u32, text: &str) {
        self.cmd(json!({"cmd": "insert", "index": index, "text": text}))
            .await;
    }

    /// Inserts at the end of the text as it is when the command runs (one step in the client,
    /// unlike `text` + `insert`, between which remote updates may arrive).
    pub async fn append(&mut self, text: &str) {
        self.cmd(json!({"cmd": "append", "text": text})).await;
    }

    pub async fn text(&mut self) -> String {
        self.cmd(json!({"cmd": "text"})).await["text"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn set_awareness(&mut self, state: Value) {
        self.cmd(json!({"cmd": "awareness", "state": state})).await;
    }

    pub async fn peers(&mut self) -> Vec<Value> {
        self.cmd(json!({"cmd": "peers"})).await["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn client_id(&mut self) -> u64 {
        self.wait_event(|e| e["event"] == "ready").await["clientID"]
            .as_u64()
            .expect("clientID")
    }

    /// Polls the text until it equals `expected`.
    pub async fn wait_text(&mut self, expected: &str) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let t = self.text().await;
            if t == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "stock client text is {t:?}, expected {expected:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn quit(mut self) {
        let _ = self.cmd(json!({"cmd": "quit"})).await;
        let _ = tokio::time::timeout(DEADLINE, self.child.wait()).await;
    }

    /// Kills the process: its socket drops without a goodbye.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
