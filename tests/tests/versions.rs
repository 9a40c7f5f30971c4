//! Version history end to end: keep/list/read/delete over HTTP with auth, automatic versions
//! and their retention, restore with stock Yjs clients editing every root type (and editing
//! during the restore), versions across restarts and compaction, and the S3 store.

use chorus_protocol::DocId;
use chorus_server::storage::SnapshotStore;
use chorus_server::storage::s3::S3SnapshotStore;
use chorus_tests::s3::S3Server;
use chorus_tests::stock::StockClient;
use chorus_tests::{DEADLINE, ServerProcess, TestServer, eventually, http};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact, Update};

const SECRET: &str = "versions-secret";

fn token(access: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "t", "exp": now + 600, "iat": now - 1,
                "docs": [{"doc": "*", "access": access}]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> http::Response {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    http::request(addr, method, path, &headers, body)
        .await
        .expect("http")
}

async fn keep(addr: SocketAddr, doc: &str, name: Option<&str>, token: Option<&str>) -> Value {
    let body = name.map_or(Vec::new(), |n| json!({"name": n}).to_string().into_bytes());
    let r = call(
        addr,
        "POST",
        &format!("/v1/docs/{doc}/versions"),
        token,
        &body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn list(addr: SocketAddr, doc: &str, token: Option<&str>) -> Vec<Value> {
    let r = call(addr, "GET", &format!("/v1/docs/{doc}/versions"), token, b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json().as_array().cloned().expect("a list")
}

async fn restore(addr: SocketAddr, doc: &str, id: &Value) -> http::Response {
    let id = id.as_str().expect("id");
    call(
        addr,
        "POST",
        &format!("/v1/docs/{doc}/versions/{id}/restore"),
        None,
        b"",
    )
    .await
}

/// A writer of plain yrs updates over `POST /v1/docs/{doc}/updates`.
struct HttpWriter {
    doc: yrs::Doc,
    text: yrs::TextRef,
}

impl HttpWriter {
    fn new() -> Self {
        let doc = yrs::Doc::new();
        let text = doc.get_or_insert_text("t");
        HttpWriter { doc, text }
    }

    async fn edit(
        &self,
        addr: SocketAddr,
        doc: &str,
        f: impl FnOnce(&mut yrs::TransactionMut, &yrs::TextRef),
    ) {
        let sv = self.doc.transact().state_vector();
        {
            let mut txn = self.doc.transact_mut();
            f(&mut txn, &self.text);
        }
        let update = self.doc.transact().encode_state_as_update_v1(&sv);
        let r = http::post(addr, &format!("/v1/docs/{doc}/updates"), &update)
            .await
            .expect("post");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    async fn append(&self, addr: SocketAddr, doc: &str, s: &str) {
        self.edit(addr, doc, |txn, text| {
            let len = text.len(txn);
            text.insert(txn, len, s);
        })
        .await;
    }
}

/// The text `t` of a document's state as the server serves it.
async fn served_text(addr: SocketAddr, path: &str) -> String {
    let r = http::get(addr, path).await.expect("get");
    assert_eq!(r.status, 200);
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    doc.transact_mut()
        .apply_update(Update::decode_v1(&r.body).expect("decode"))
        .expect("apply");
    let txn = doc.transact();
    text.get_string(&txn)
}

#[tokio::test]
async fn versions_are_kept_listed_read_and_deleted_under_auth() {
    let server = TestServer::start(|c| c.auth_secret = Some(SECRET.into())).await;
    let (writer, reader) = (token("write"), token("read"));
    let addr = server.addr;
    // A read grant cannot keep a version; a write grant can.
    let r = call(addr, "POST", "/v1/docs/d/versions", Some(&reader), b"").await;
    assert_eq!(r.status, 403);
    let r = call(addr, "POST", "/v1/docs/d/versions", None, b"").await;
    assert_eq!(r.status, 401);
    let first = keep(addr, "d", None, Some(&writer)).await;
    let named = keep(addr, "d", Some("before launch"), Some(&writer)).await;
    assert_eq!(named["name"], "before launch");
    assert_eq!(named["kind"], "named");
    assert_eq!(first["kind"], "auto");
    for field in ["id", "position", "created_at", "bytes"] {
        assert!(!named[field].is_null(), "{field} in {named}");
    }
    // Listed newest first, to a reader too.
    let listed = list(addr, "d", Some(&reader)).await;
    let ids: Vec<&Value> = listed.iter().map(|v| &v["id"]).collect();
    assert_eq!(ids, vec![&named["id"], &first["id"]]);
    // Read as one update, by a reader.
    let id = named["id"].as_str().expect("id");
    let r = call(
        addr,
        "GET",
        &format!("/v1/docs/d/versions/{id}"),
        Some(&reader),
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, named["bytes"].as_u64().expect("bytes"));
    assert!(Update::decode_v1(&r.body).is_ok());
    // A reader can neither restore nor delete.
    for (method, path) in [
        ("POST", format!("/v1/docs/d/versions/{id}/restore")),
        ("DELETE", format!("/v1/docs/d/versions/{id}")),
    ] {
        let r = call(addr, method, &path, Some(&reader), b"").await;
        assert_eq!(r.status, 403, "{method} {path}");
    }
    // Bad ids and names are refused before anything is touched; no path climbs out.
    for bad in ["..%2F..%2Fetc", "1700000000000-XYZ", "latest"] {
        let r = call(
            addr,
            "GET",
            &format!("/v1/docs/d/versions/{bad}"),
            Some(&reader),
            b"",
        )
        .await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"], "bad_version_id");
    }
    let long = json!({"name": "x".repeat(300)}).to_string();
    let r = call(
        addr,
        "POST",
        "/v1/docs/d/versions",
        Some(&writer),
        long.as_bytes(),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_version_name"))
    );
    let r = call(addr, "POST", "/v1/docs/d/versions", Some(&writer), b"{nope").await;
    assert_eq!(r.status, 400);
    // A writer restores (nothing changed since: nothing appended).
    let r = call(
        addr,
        "POST",
        &format!("/v1/docs/d/versions/{id}/restore"),
        Some(&writer),
        b"",
    )
    .await;
    assert_eq!((r.status, r.json()["bytes"].clone()), (200, json!(0)));
    // Deleted: gone from the list, 404 after.
    let version = format!("/v1/docs/d/versions/{id}");
    for (method, token, status) in [
        ("DELETE", &writer, 204),
        ("DELETE", &writer, 404),
        ("GET", &reader, 404),
    ] {
        let r = call(addr, method, &version, Some(token), b"").await;
        assert_eq!(r.status, status, "{method} {version}");
    }
    assert_eq!(list(addr, "d", Some(&reader)).await.len(), 1);
    server.stop().await;
}

fn count(versions: &[Value], kind: &str) -> usize {
    versions.iter().filter(|v| v["kind"] == kind).count()
}

#[tokio::test]
async fn automatic_versions_follow_edits_and_keep_the_newest() {
    let interval = Duration::from_millis(300);
    let server = TestServer::start(|c| {
        c.version_interval = interval;
        c.keep_versions = 3;
    })
    .await;
    let addr = server.addr;
    let writer = HttpWriter::new();
    let named = keep(addr, "auto", Some("kept forever"), None).await;
    // Each round of editing gets its version once the interval after its first edit passed.
    for round in 0..5 {
        writer.append(addr, "auto", &format!("<{round}>")).await;
        let expected = (round + 1).min(3);
        let newest = eventually("an automatic version of the round", DEADLINE, || async {
            let versions = list(addr, "auto", None).await;
            let auto: Vec<&Value> = versions.iter().filter(|v| v["kind"] == "auto").collect();
            let first = auto.first()?;
            // The newest automatic version holds this round's edit.
            let id = first["id"].as_str()?.to_string();
            let text = served_text(addr, &format!("/v1/docs/auto/versions/{id}")).await;
            (text.ends_with(&format!("<{round}>")) && auto.len() == expected).then_some(versions)
        })
        .await;
        assert_eq!(count(&newest, "auto"), expected);
        assert!(
            newest.iter().any(|v| v["id"] == named["id"]),
            "the named version is kept"
        );
    }
    // No edits: no new versions, however many intervals pass (a bounded look, not a sync).
    let before = list(addr, "auto", None).await;
    tokio::time::sleep(interval * 4).await;
    assert_eq!(list(addr, "auto", None).await, before);
    // Unnamed versions kept over HTTP count with the automatic ones.
    for _ in 0..4 {
        keep(addr, "auto", None, None).await;
    }
    let after = list(addr, "auto", None).await;
    assert_eq!((count(&after, "auto"), count(&after, "named")), (3, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_document_unloading_with_unkept_edits_gets_an_automatic_version() {
    let server = TestServer::start(|c| {
        c.version_interval = Duration::from_secs(3600);
        c.evict_after = Duration::from_millis(100);
    })
    .await;
    let addr = server.addr;
    HttpWriter::new()
        .append(addr, "brief", "a short session")
        .await;
    // Nobody holds the document: it unloads well before the hour is up, and keeps its edits.
    let kept = eventually("a version kept at unload", DEADLINE, || async {
        let versions = list(addr, "brief", None).await;
        (count(&versions, "auto") == 1).then_some(versions)
    })
    .await;
    let id = kept[0]["id"].as_str().expect("id");
    let path = format!("/v1/docs/brief/versions/{id}");
    assert_eq!(served_text(addr, &path).await, "a short session");
    server.stop().await;
}

const ROOTS: &str = r#"{"t":"text","m":"map","a":"array","x":"xml","late":"text"}"#;

async fn content(c: &mut StockClient) -> Value {
    let roots: Value = serde_json::from_str(ROOTS).expect("roots");
    c.cmd(json!({"cmd": "content", "roots": roots})).await["content"].clone()
}

async fn edit(c: &mut StockClient, ops: Value) {
    let r = c.cmd(json!({"cmd": "edit", "ops": ops})).await;
    assert_eq!(r["ok"], "edit", "{r}");
}

/// Waits until every client shows `expected` (all root types, as JSON from the JS side).
async fn all_show(clients: &mut [StockClient], expected: &Value) {
    for c in clients.iter_mut() {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let got = content(c).await;
            if &got == expected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "client shows {got}\nexpected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until every client shows the same content, and returns it.
async fn converged(clients: &mut [StockClient]) -> Value {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut seen = Vec::new();
        for c in clients.iter_mut() {
            seen.push(content(c).await);
        }
        if seen.windows(2).all(|w| w[0] == w[1]) {
            return seen.swap_remove(0);
        }
        assert!(
            tokio::time::Instant::now() < until,
            "clients never converged: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn first_edits() -> Value {
    json!([
        {"op": "insert", "root": "t", "type": "text", "index": 0, "text": "hello brave world"},
        {"op": "format", "root": "t", "type": "text", "index": 0, "len": 5, "attrs": {"bold": true}},
        {"op": "set", "root": "m", "type": "map", "key": "title", "value": "draft"},
        {"op": "set", "root": "m", "type": "map", "key": "doomed", "value": 1},
        {"op": "set", "root": "m", "type": "map", "key": "nested",
         "value": {"$type": "map", "entries": {"deep": "value", "list": {"$type": "array", "items": [1, 2]}}}},
        {"op": "insert", "root": "a", "type": "array", "index": 0,
         "values": ["first", {"$type": "text", "text": "inner"}, {"$type": "map", "entries": {"k": "v"}}]},
        {"op": "insert", "root": "x", "type": "xml", "index": 0,
         "values": [{"$type": "element", "name": "p", "attrs": {"class": "lead"}, "text": "para"}]}
    ])
}

fn second_edits() -> Value {
    json!([
        {"op": "delete", "root": "t", "type": "text", "index": 6, "len": 6},
        {"op": "insert", "root": "t", "type": "text", "index": 0, "text": ">> ", "attrs": {"italic": true}},
        {"op": "format", "root": "t", "type": "text", "index": 3, "len": 5, "attrs": {"bold": null}},
        {"op": "unset", "root": "m", "type": "map", "key": "doomed"},
        {"op": "set", "root": "m", "type": "map", "key": "title", "value": "final"},
        {"op": "unset", "root": "m", "type": "map", "path": ["nested"], "key": "deep"},
        {"op": "insert", "root": "m", "type": "map", "path": ["nested", "list"], "index": 0, "values": [0]},
        {"op": "delete", "root": "a", "type": "array", "index": 0, "len": 1},
        {"op": "insert", "root": "a", "type": "array", "path": [0], "index": 0, "text": "edited "},
        {"op": "set", "root": "a", "type": "array", "path": [1], "key": "k2", "value": "v2"},
        {"op": "delete", "root": "x", "type": "xml", "index": 0, "len": 1},
        {"op": "insert", "root": "x", "type": "xml", "index": 0,
         "values": [{"$type": "element", "name": "h1", "text": "title"}]},
        {"op": "insert", "root": "late", "type": "text", "index": 0, "text": "born after v1"}
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_brings_every_stock_client_back_and_is_undone_by_a_later_version() {
    let server = TestServer::start(|_| {}).await;
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = StockClient::spawn(&server.yjs_base(), "restore").await;
        c.wait_event(|e| e["event"] == "synced").await;
        clients.push(c);
    }
    edit(&mut clients[0], first_edits()).await;
    let v1_content = converged(&mut clients).await;
    assert_eq!(v1_content["m"]["title"], "draft", "{v1_content}");
    // Kept once the server has everything the clients show.
    eventually("the server holds the first edits", DEADLINE, || async {
        let text = served_text(addr, "/v1/docs/restore").await;
        (text == "hello brave world").then_some(())
    })
    .await;
    let v1 = keep(addr, "restore", Some("v1"), None).await;

    edit(&mut clients[1], second_edits()).await;
    let v2_content = converged(&mut clients).await;
    assert_ne!(v2_content, v1_content);
    eventually("the server holds the second edits", DEADLINE, || async {
        let text = served_text(addr, "/v1/docs/restore").await;
        text.starts_with(">> ").then_some(())
    })
    .await;
    let v2 = keep(addr, "restore", Some("v2"), None).await;

    // Restore v1: every client's every root is v1's again (the root born later is empty).
    let r = restore(addr, "restore", &v1["id"]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["position"].is_string());
    let mut expected = v1_content.clone();
    expected["late"] = json!([]);
    all_show(&mut clients, &expected).await;

    // The restore is undone by restoring a version kept before it.
    let r = restore(addr, "restore", &v2["id"]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    all_show(&mut clients, &v2_content).await;

    // A client edits while a restore is computed and appended: everyone converges, and the
    // concurrent edit is not lost.
    let restoring = tokio::spawn(async move { restore(addr, "restore", &v1["id"]).await });
    for i in 0..5 {
        edit(
            &mut clients[1],
            json!([{"op": "set", "root": "m", "type": "map", "key": format!("during{i}"), "value": i}]),
        )
        .await;
    }
    let r = restoring.await.expect("restore task");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Edits that reached the document before the restore read it are undone with the rest;
    // later ones merge with it. Either way every client ends with the same content: v1's, plus
    // the concurrent keys that came after.
    let after = converged(&mut clients).await;
    let mut without_concurrent = after.clone();
    let map = without_concurrent["m"].as_object_mut().expect("map");
    for i in 0..5 {
        if let Some(v) = map.remove(&format!("during{i}")) {
            assert_eq!(v, i, "{after}");
        }
    }
    assert_eq!(without_concurrent, expected, "{after}");
    for c in clients {
        c.quit().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn versions_survive_compaction_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tune = |c: &mut chorus_server::Config| {
        c.compact_entries = 2;
        c.version_interval = Duration::ZERO;
    };
    let server = TestServer::start_in(dir.path(), tune).await;
    let addr = server.addr;
    let writer = HttpWriter::new();
    writer.append(addr, "kept", "version text").await;
    let v = keep(addr, "kept", Some("before compaction"), None).await;
    for i in 0..20 {
        writer.append(addr, "kept", &format!(" {i}")).await;
    }
    // Compaction wrote a snapshot (and trimmed the log behind it).
    let snap = dir.path().join("snapshots").join("kept.snap");
    eventually("a snapshot", DEADLINE, || async {
        snap.exists().then_some(())
    })
    .await;
    let id = v["id"].as_str().expect("id").to_string();
    let path = format!("/v1/docs/kept/versions/{id}");
    assert_eq!(served_text(addr, &path).await, "version text");
    server.stop().await;

    let server = TestServer::start_in(dir.path(), tune).await;
    let addr = server.addr;
    let listed = list(addr, "kept", None).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], v);
    assert_eq!(served_text(addr, &path).await, "version text");
    let r = restore(addr, "kept", &v["id"]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(served_text(addr, "/v1/docs/kept").await, "version text");
    // Nothing changed since: a second restore appends nothing.
    let r = restore(addr, "kept", &v["id"]).await;
    assert_eq!((r.status, r.json()["bytes"].clone()), (200, json!(0)));
    server.stop().await;
}

#[tokio::test]
async fn a_restore_larger_than_max_update_bytes_is_refused() {
    let server = TestServer::start(|c| {
        c.max_update_bytes = 4096;
        c.version_interval = Duration::ZERO;
    })
    .await;
    let addr = server.addr;
    let writer = HttpWriter::new();
    for _ in 0..4 {
        writer.append(addr, "big", &"x".repeat(3000)).await;
    }
    let v = keep(addr, "big", None, None).await;
    writer
        .edit(addr, "big", |txn, text| {
            let len = text.len(txn);
            text.remove_range(txn, 0, len);
        })
        .await;
    // Bringing 12 000 characters back is one update over the 4096-byte limit.
    let r = restore(addr, "big", &v["id"]).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "restore_too_large");
    assert_eq!(
        served_text(addr, "/v1/docs/big").await,
        "",
        "nothing was appended"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_live_in_the_s3_store() {
    let s3 = S3Server::start("versions").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = ServerProcess::spawn_env(
        dir.path(),
        &[
            "--snapshot-store",
            "s3://versions/nodes",
            "--version-interval",
            "0",
        ],
        &s3.env(),
    )
    .await;
    let addr = node.addr;
    let writer = HttpWriter::new();
    writer.append(addr, "s3doc", "in the bucket").await;
    let a = keep(addr, "s3doc", Some("a"), None).await;
    let b = keep(addr, "s3doc", None, None).await;
    let listed = list(addr, "s3doc", None).await;
    assert_eq!(listed, vec![b.clone(), a.clone()]);
    let id = a["id"].as_str().expect("id");
    assert_eq!(
        served_text(addr, &format!("/v1/docs/s3doc/versions/{id}")).await,
        "in the bucket"
    );
    // In the bucket itself, beside (not among) the snapshots.
    let options = s3.options();
    let options: Vec<(&str, &str)> = options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let store = S3SnapshotStore::from_url_with("s3://versions/nodes", &options).expect("store");
    let doc = DocId::parse("s3doc").expect("id");
    let stored = store.list_versions(&doc).await.expect("list");
    assert_eq!(stored.len(), 2);
    let r = call(
        addr,
        "DELETE",
        &format!("/v1/docs/s3doc/versions/{id}"),
        None,
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(store.list_versions(&doc).await.expect("list").len(), 1);
    assert_eq!(list(addr, "s3doc", None).await, vec![b]);
    node.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_redis_keep_one_automatic_version_per_round() {
    let redis = chorus_tests::redis::RedisServer::start().await;
    let shared = tempfile::tempdir().expect("tempdir");
    let interval = Duration::from_millis(300);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (url, dir) = (redis.url(), shared.path().to_path_buf());
        nodes.push(
            TestServer::start(move |c| {
                c.redis_url = vec![url];
                c.snapshot_dir = Some(dir);
                c.replay_window = Duration::from_secs(10);
                c.version_interval = interval;
            })
            .await,
        );
    }
    // The document is hot on both nodes: both apply every edit, both clocks run out.
    let mut watchers = Vec::new();
    for node in &nodes {
        let mut c = chorus_tests::native::NativeClient::connect(&node.ws_url()).await;
        c.subscribe_synced("shared").await;
        watchers.push(c);
    }
    let writer = HttpWriter::new();
    for round in 1..=3usize {
        writer
            .append(nodes[0].addr, "shared", &format!("<{round}>"))
            .await;
        eventually("this round's automatic version", DEADLINE, || async {
            (count(&list(nodes[1].addr, "shared", None).await, "auto") >= round).then_some(())
        })
        .await;
        // Both nodes' clocks ran out; give the slower one several intervals (a bounded look
        // for a duplicate, not a synchronisation).
        tokio::time::sleep(interval * 3).await;
        assert_eq!(
            count(&list(nodes[1].addr, "shared", None).await, "auto"),
            round
        );
    }
    drop(watchers);
    for node in nodes {
        node.stop().await;
    }
}
