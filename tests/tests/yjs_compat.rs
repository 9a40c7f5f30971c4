//! A stock Yjs client (npm yjs + y-websocket) and a native client edit one document.

use chorus_protocol::ServerFrame;
use chorus_tests::native::NativeClient;
use chorus_tests::stock::StockClient;
use chorus_tests::{DEADLINE, TestServer};
use serde_json::json;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;

fn awareness_clients(frame: &ServerFrame) -> Vec<(u64, String)> {
    match frame {
        ServerFrame::Awareness { update, .. } => AwarenessUpdate::decode_v1(update)
            .expect("awareness decodes")
            .clients
            .into_iter()
            .map(|(id, e)| (id.get(), e.json.to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads awareness frames until client `id`'s state satisfies `want`.
async fn wait_awareness(
    native: &mut NativeClient,
    id: u64,
    want: impl Fn(&str) -> bool,
    what: &str,
) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let f = native
            .wait_for(|f| matches!(f, ServerFrame::Awareness { .. }))
            .await;
        if awareness_clients(&f)
            .iter()
            .any(|(i, j)| *i == id && want(j))
        {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "{what}");
    }
}

#[tokio::test]
async fn stock_yjs_client_and_native_client_converge_and_share_presence() {
    let server = TestServer::start(|_| {}).await;
    let mut native = NativeClient::connect(&server.ws_url()).await;
    native.subscribe_synced("shared").await;
    let s = native.insert("shared", 0, "native ").await;
    native.wait_acked(s).await;

    let mut stock = StockClient::spawn(&server.yjs_base(), "shared").await;
    stock
        .wait_event(|e| e["event"] == "synced" && e["synced"] == true)
        .await;
    stock.wait_text("native ").await;

    stock.insert(7, "and stock").await;
    native.wait_text("shared", "native and stock").await;

    native.insert("shared", 0, ">> ").await;
    stock.wait_text(">> native and stock").await;

    // Presence: the stock client's awareness state reaches the native client...
    let stock_id = stock.client_id().await;
    stock
        .set_awareness(json!({"user": {"name": "ada", "color": "#ff0000"}}))
        .await;
    wait_awareness(
        &mut native,
        stock_id,
        |j| j.contains("ada"),
        "stock awareness never arrived",
    )
    .await;
    // ...and is removed (state null) when the stock client's socket goes away.
    stock.kill().await;
    wait_awareness(
        &mut native,
        stock_id,
        |j| j == "null",
        "stock awareness was never removed",
    )
    .await;
    assert!(native.errors.is_empty(), "{:?}", native.errors);
}

#[tokio::test]
async fn two_stock_clients_sync_through_chorus_and_see_each_other() {
    let server = TestServer::start(|_| {}).await;
    let mut a = StockClient::spawn(&server.yjs_base(), "pair").await;
    let mut b = StockClient::spawn(&server.yjs_base(), "pair").await;
    a.insert(0, "from a").await;
    b.wait_text("from a").await;
    b.insert(0, "b+").await;
    a.wait_text("b+from a").await;
    a.set_awareness(json!({"name": "a"})).await;
    let b_peers = b
        .wait_event(|e| {
            e["event"] == "awareness" && e["peers"].as_array().is_some_and(|p| !p.is_empty())
        })
        .await;
    assert_eq!(b_peers["peers"][0]["state"]["name"], "a");
    // A late joiner gets the whole document from the server.
    let mut c = StockClient::spawn(&server.yjs_base(), "pair").await;
    c.wait_text("b+from a").await;
    for s in [a, b, c] {
        s.quit().await;
    }
}
