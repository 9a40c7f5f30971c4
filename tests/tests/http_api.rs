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
