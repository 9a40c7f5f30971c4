//! The HTTP document API: a backend reads and writes documents through the same path as clients.

use chorus_tests::native::NativeClient;
use chorus_tests::{TestServer, http};
use yrs::updates::decoder::Decode;
use yrs::{GetString, ReadTxn, Text, Transact};

fn text_of(update: &[u8]) -> String {
    let doc = yrs::Doc::new();
    doc.transact_mut()
        .apply_update(yrs::Update::decode_v1(update).expect("decode"))
        .expect("apply");
    doc.get_or_insert_text("t").get_string(&doc.transact())
}

#[tokio::test]
async fn post_then_get_round_trips_and_reaches_live_clients() {
    let server = TestServer::start(|_| {}).await;
    let mut live = NativeClient::connect(&server.ws_url()).await;
    live.subscribe_synced("api").await;

    let backend = yrs::Doc::new();
    let text = backend.get_or_insert_text("t");
    text.insert(&mut backend.transact_mut(), 0, "from the backend");
    let update = backend
        .transact()
        .encode_state_as_update_v1(&Default::default());

    let resp = http::post(server.addr, "/v1/docs/api/updates", &update)
        .await
        .expect("POST");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let position: chorus_protocol::Position = resp.json()["position"]
        .as_str()
        .expect("position")
        .parse()
        .expect("parse");

    let got = http::get(server.addr, "/v1/docs/api").await.expect("GET");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        text_of(&got.body),
        "from the backend",
        "read-your-writes right after the POST"
    );
    assert_eq!(
        got.header("x-chorus-position").map(str::to_owned),
        Some(position.to_string())
    );

    live.wait_text("api", "from the backend").await;
    assert_eq!(live.positions["api"], position);
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let server = TestServer::start(|c| c.max_update_bytes = 1024).await;
    let bad = http::post(server.addr, "/v1/docs/api/updates", &[1, 2, 3])
        .await
        .expect("POST");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "bad_update");
    let big = http::post(server.addr, "/v1/docs/api/updates", &vec![0u8; 4096])
        .await
        .expect("POST");
    assert_eq!(big.status, 413);
    let id = http::get(server.addr, "/v1/docs/no%2Fslash")
        .await
        .expect("GET");
    assert_eq!(id.status, 400);
    let health = http::get(server.addr, "/healthz").await.expect("GET");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["backplane"], "embedded");
}

#[tokio::test]
async fn posts_respect_the_document_size_limit_even_on_a_cold_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tune = |c: &mut chorus_server::Config| c.max_document_bytes = 2000;
    let backend = yrs::Doc::new();
    let text = backend.get_or_insert_text("t");
    let post = |s: &str| {
        let before = backend.transact().state_vector();
        let len = text.len(&backend.transact());
        text.insert(&mut backend.transact_mut(), len, s);
        backend.transact().encode_state_as_update_v1(&before)
    };
    let first = post(&"a".repeat(1500));
    let second = post(&"b".repeat(1500));
    let server = TestServer::start_in(dir.path(), tune).await;
    let ok = http::post(server.addr, "/v1/docs/cap/updates", &first)
        .await
        .expect("POST");
    assert_eq!(ok.status, 200);
    server.stop().await;
    // After a restart the document is cold; its size must still be known before appending.
    let server = TestServer::start_in(dir.path(), tune).await;
    let full = http::post(server.addr, "/v1/docs/cap/updates", &second)
        .await
        .expect("POST");
    assert_eq!(full.status, 413);
    assert_eq!(full.json()["error"], "document_too_large");
    let got = http::get(server.addr, "/v1/docs/cap").await.expect("GET");
    assert_eq!(text_of(&got.body), "a".repeat(1500));
}

/// What a backend posts: a map with a nested type and an XML fragment, as yrs makes them.
fn map_and_xml_update() -> Vec<u8> {
    use yrs::{Map, MapPrelim, XmlElementPrelim, XmlFragment, XmlTextPrelim};
    let doc = yrs::Doc::new();
    let meta = doc.get_or_insert_map("meta");
    let body = doc.get_or_insert_xml_fragment("body");
    let mut txn = doc.transact_mut();
    meta.insert(&mut txn, "author", "ada");
    let nested = meta.insert(&mut txn, "nested", MapPrelim::default());
    nested.insert(&mut txn, "n", 1);
    let p = body.push_back(&mut txn, XmlElementPrelim::empty("paragraph"));
    p.push_back(&mut txn, XmlTextPrelim::new("xml text"));
    drop(txn);
    doc.transact()
        .encode_state_as_update_v1(&Default::default())
}

/// `GET …/json` reads back, as data, what a stock Yjs client and a backend wrote (the server
/// never typed those roots); the inspector tells what the document is made of and how this
/// node holds it, and a document it did not hold reads as not hot.
#[tokio::test]
async fn json_and_the_inspector_read_what_clients_wrote() {
    use chorus_tests::stock::StockClient;
    // No compaction during the test: the log since the snapshot is what was written.
    let server = TestServer::start(|c| {
        c.compact_entries = 1000;
        c.compact_bytes = 1 << 20;
    })
    .await;
    let cold = http::get(server.addr, "/v1/docs/ed/inspect")
        .await
        .expect("GET");
    assert_eq!(cold.status, 200, "{}", String::from_utf8_lossy(&cold.body));
    assert_eq!(cold.json()["hot"], false, "nobody had asked for it yet");
    assert_eq!(cold.json()["roots"], serde_json::json!([]));

    let mut stock = StockClient::spawn(&server.yjs_base(), "ed").await;
    stock.append("typed in Yjs").await;
    let mut live = NativeClient::connect(&server.ws_url()).await;
    live.subscribe_synced("ed").await;
    let posted = http::post(server.addr, "/v1/docs/ed/updates", &map_and_xml_update())
        .await
        .expect("POST");
    assert_eq!(posted.status, 200);
    live.wait_text("ed", "typed in Yjs").await;

    let expected = serde_json::json!({
        "body": [{"nodeName": "paragraph", "attributes": {}, "children": ["xml text"]}],
        "meta": {"author": "ada", "nested": {"n": 1}},
        "t": "typed in Yjs",
    });
    let json = http::get(server.addr, "/v1/docs/ed/json")
        .await
        .expect("GET");
    assert_eq!(json.status, 200, "{}", String::from_utf8_lossy(&json.body));
    assert_eq!(json.json(), expected);
    let delta = http::get(server.addr, "/v1/docs/ed/json?text=delta")
        .await
        .expect("GET");
    assert_eq!(
        delta.json()["t"],
        serde_json::json!([{"insert": "typed in Yjs"}])
    );
    let bad = http::get(server.addr, "/v1/docs/ed/json?types=t:blob")
        .await
        .expect("GET");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "bad_query");

    let state = http::get(server.addr, "/v1/docs/ed").await.expect("GET");
    let inspect = http::get(server.addr, "/v1/docs/ed/inspect")
        .await
        .expect("GET");
    let i = inspect.json();
    assert_eq!(i["hot"], true);
    assert_eq!(
        i["position"].as_str(),
        state.header("x-chorus-position"),
        "{i}"
    );
    assert_eq!(i["state_bytes"], state.body.len());
    assert_eq!(i["clients"], 2, "the stock client and the backend: {i}");
    assert_eq!(i["subscribers"]["native"], 1, "{i}");
    assert_eq!(i["subscribers"]["y-websocket"], 1, "{i}");
    // Whatever snapshot the owner saved (the first append made the log, a new epoch, which the
    // owner may snapshot at once; a slow machine may see it saved later too), the log since it
    // is what the inspector counts: nothing at the snapshot's own position, something after it.
    let since = (
        i["log_since_snapshot"]["entries"].as_u64(),
        i["log_since_snapshot"]["bytes"].as_u64(),
    );
    if i["snapshot_position"] == i["position"] {
        assert_eq!(since, (Some(0), Some(0)), "{i}");
    } else {
        assert!(since.0 >= Some(1) && since.1 > Some(0), "{i}");
    }
    if !i["last_compaction"].is_null() {
        assert_eq!(i["last_compaction"]["position"], i["snapshot_position"]);
    }
    assert_eq!(i["replay_memory"]["entries"], 2, "{i}");
    assert_eq!(i["gap"], false);
    assert_eq!(
        i["roots"],
        serde_json::json!([
            {"name": "body", "kind": "xml", "length": 1},
            {"name": "meta", "kind": "map", "length": 2},
            {"name": "t", "kind": "text", "length": 12},
        ])
    );
    stock.quit().await;
}

/// `GET …/json` agrees with what a stock Yjs client itself reads from every root type it
/// edited: formatted text (as a delta), a map and an array holding nested types (as Yjs's
/// `toJSON`), and an XML fragment (as a tree of what Yjs prints as XML).
#[tokio::test]
async fn json_matches_what_a_stock_client_reads() {
    use chorus_tests::stock::StockClient;
    use serde_json::json;
    let server = TestServer::start(|_| {}).await;
    let mut stock = StockClient::spawn(&server.yjs_base(), "data").await;
    let edits = json!([
        {"op": "insert", "root": "t", "type": "text", "index": 0, "text": "hello brave world"},
        {"op": "format", "root": "t", "type": "text", "index": 0, "len": 5, "attrs": {"bold": true}},
        {"op": "delete", "root": "t", "type": "text", "index": 6, "len": 6},
        {"op": "set", "root": "m", "type": "map", "key": "title", "value": "draft"},
        {"op": "set", "root": "m", "type": "map", "key": "gone", "value": 1},
        {"op": "unset", "root": "m", "type": "map", "key": "gone"},
        {"op": "set", "root": "m", "type": "map", "key": "nested",
         "value": {"$type": "map", "entries": {"deep": "value", "list": {"$type": "array", "items": [1, 2]}}}},
        {"op": "insert", "root": "a", "type": "array", "index": 0,
         "values": ["first", {"$type": "text", "text": "inner"}, {"$type": "map", "entries": {"k": "v"}}]},
        {"op": "insert", "root": "x", "type": "xml", "index": 0,
         "values": [{"$type": "element", "name": "p", "attrs": {"class": "lead"}, "text": "para"}]}
    ]);
    let r = stock.cmd(json!({"cmd": "edit", "ops": edits})).await;
    assert_eq!(r["ok"], "edit", "{r}");
    let roots = json!({"t": "text", "m": "map", "a": "array", "x": "xml"});
    let js = stock.cmd(json!({"cmd": "content", "roots": roots})).await["content"].clone();
    assert_eq!(js["x"], "<p class=\"lead\">para</p>", "{js}");
    let expected = |served: &serde_json::Value| {
        served["m"] == js["m"]
            && served["a"] == js["a"]
            && served["x"]
                == json!([{"nodeName": "p", "attributes": {"class": "lead"}, "children": ["para"]}])
    };
    let served = chorus_tests::eventually(
        "the edit reaches the server",
        chorus_tests::DEADLINE,
        || async {
            let r = http::get(server.addr, "/v1/docs/data/json").await.ok()?;
            let j = r.json();
            expected(&j).then_some(j)
        },
    )
    .await;
    assert_eq!(served["t"], "hello world");
    let delta = http::get(server.addr, "/v1/docs/data/json?text=delta")
        .await
        .expect("GET")
        .json();
    assert_eq!(delta["t"], js["t"], "the text's delta, formatting kept");
    stock.quit().await;
}
