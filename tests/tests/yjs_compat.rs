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

/// A stock client joining a document larger than its outbox budget while others write: the
/// sync step 2 that carries the document must reach it even when updates behind it overflow
/// the budget (they are dropped and caught up after it; the answer never is). The flush
/// interval holds the client's writer after its first write (our sync step 1), so updates
/// always pile up behind the answer before it drains.
#[tokio::test]
async fn a_stock_client_joining_a_document_above_its_budget_while_others_write_gets_all_of_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const BIG: usize = 300 * 1024;
    let server = TestServer::start(|c| {
        c.outbox_bytes = 32 * 1024;
        c.flush_interval = std::time::Duration::from_millis(200);
    })
    .await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("above").await;
    let seq = writer.insert("above", 0, &"x".repeat(BIG)).await;
    writer.wait_acked(seq).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn({
        let stop = stop.clone();
        async move {
            // Paced, not ack by ack: acks are held by the flush interval too.
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                last = writer.insert("above", 0, "y").await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            writer.wait_acked(last).await;
            writer
        }
    });
    let mut stock = StockClient::spawn(&server.yjs_base(), "above").await;
    let until = tokio::time::Instant::now() + DEADLINE;
    while stock.text().await.len() < BIG {
        assert!(
            tokio::time::Instant::now() < until,
            "the stock client never got the document it joined"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut writer = writing.await.expect("writer");
    let expected = writer.text("above");
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let have = stock.text().await;
        if have == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the stock client has {} of {} characters",
            have.len(),
            expected.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stock.quit().await;
}

/// The same join, step by step as a y-websocket client takes it: it reads our sync step 1
/// before it sends its own, so the step 1 has gone out alone when the answer (the document)
/// is queued behind a burst of updates that overflows the budget. A step 1 carries no content
/// and must not count as a position the catch-up could start from.
#[tokio::test]
async fn a_y_websocket_join_whose_answer_waits_behind_a_burst_still_gets_the_whole_document() {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio_tungstenite::tungstenite::Message;
    use yrs::sync::{Message as YMessage, SyncMessage};
    use yrs::updates::decoder::Decode;
    use yrs::{GetString, Transact};
    const BIG: usize = 300 * 1024;
    let server = TestServer::start(|c| {
        c.outbox_bytes = 32 * 1024;
        c.flush_interval = std::time::Duration::from_millis(200);
    })
    .await;
    let mut writer = NativeClient::connect(&server.ws_url()).await;
    writer.subscribe_synced("burst").await;
    let seq = writer.insert("burst", 0, &"x".repeat(BIG)).await;
    writer.wait_acked(seq).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn({
        let stop = stop.clone();
        async move {
            // Paced, not ack by ack: acks are held by the flush interval too.
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                last = writer.insert("burst", 0, "y").await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            writer.wait_acked(last).await;
            writer
        }
    });
    let (mut y, _) = tokio_tungstenite::connect_async(format!("{}/burst", server.yjs_base()))
        .await
        .expect("connect");
    let local = yrs::Doc::new();
    let text = local.get_or_insert_text("t");
    let mut asked = false;
    let apply = |bytes: &[u8]| -> bool {
        match YMessage::decode_v1(bytes) {
            Ok(YMessage::Sync(SyncMessage::SyncStep1(_))) => true,
            Ok(YMessage::Sync(SyncMessage::SyncStep2(u) | SyncMessage::Update(u))) => {
                let u = yrs::Update::decode_v1(&u).expect("update decodes");
                local.transact_mut().apply_update(u).expect("applies");
                false
            }
            _ => false,
        }
    };
    let until = tokio::time::Instant::now() + DEADLINE;
    while text.get_string(&local.transact()).len() < BIG {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let frame = tokio::time::timeout(left, y.next())
            .await
            .expect("the whole document arrives in time")
            .expect("socket open")
            .expect("frame");
        if let Message::Binary(b) = frame
            && apply(&b)
            && !std::mem::replace(&mut asked, true)
        {
            // Our step 1, read: now ask for the document.
            y.send(Message::Binary(vec![0u8, 0, 1, 0].into()))
                .await
                .expect("send step 1");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut writer = writing.await.expect("writer");
    let expected = writer.text("burst");
    while text.get_string(&local.transact()) != expected {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(Ok(Message::Binary(b)))) = tokio::time::timeout(left, y.next()).await else {
            panic!("the client never caught up with the writer");
        };
        apply(&b);
    }
}

fn offline_edits() -> (Vec<u8>, Vec<u8>) {
    use yrs::{ReadTxn, Text, Transact};
    let doc = yrs::Doc::with_client_id(4242);
    let text = doc.get_or_insert_text("t");
    text.insert(&mut doc.transact_mut(), 0, "offline ");
    let first = doc
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    let after_first = doc.transact().state_vector();
    text.insert(&mut doc.transact_mut(), 8, "live");
    let second = doc.transact().encode_state_as_update_v1(&after_first);
    (first, second)
}

/// y-websocket sends live updates as soon as its socket opens, before its answer to our sync
/// step 1, which carries what they build on. The update waits while the socket keeps being
/// read, and is admitted once the answer is in: nothing is refused, nothing stalls.
#[tokio::test]
async fn an_update_sent_before_the_sync_reply_it_builds_on_is_admitted_not_refused() {
    use chorus_protocol::y_websocket::{
        sync_step2 as sync_step2_message, sync_update as sync_update_message,
    };
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    // Long enough that a socket which stopped reading for it would miss the deadline below.
    let server =
        TestServer::start(|c| c.missing_deps_wait = std::time::Duration::from_secs(60)).await;
    let (first, second) = offline_edits();
    let (mut y, _) = tokio_tungstenite::connect_async(format!("{}/reconnect", server.yjs_base()))
        .await
        .expect("connect");
    y.send(Message::Binary(sync_update_message(&second).into()))
        .await
        .expect("send");
    y.send(Message::Binary(sync_step2_message(&first).into()))
        .await
        .expect("send");
    let mut reader = NativeClient::connect(&server.ws_url()).await;
    reader.subscribe_synced("reconnect").await;
    reader.wait_text("reconnect", "offline live").await;
    let stats = chorus_tests::http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json();
    assert_eq!(stats["refused_missing_dependencies"], 0);
}

/// What an update waits for may never come: after `--missing-deps-wait` it is refused with
/// y-protocols' permission-denied message, as before, and the socket keeps working.
#[tokio::test]
async fn an_update_whose_dependencies_never_arrive_is_refused_after_the_wait() {
    use chorus_protocol::y_websocket::sync_update as sync_update_message;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start(|c| {
        c.missing_deps_wait = std::time::Duration::from_millis(200);
    })
    .await;
    let (_, second) = offline_edits();
    let (mut y, _) = tokio_tungstenite::connect_async(format!("{}/orphan", server.yjs_base()))
        .await
        .expect("connect");
    y.send(Message::Binary(sync_update_message(&second).into()))
        .await
        .expect("send");
    let denied = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(m)) = y.next().await {
            if let Message::Binary(b) = m
                && b.first() == Some(&yrs::sync::protocol::MSG_AUTH)
            {
                return b;
            }
        }
        panic!("socket ended without a permission-denied message");
    })
    .await
    .expect("refused in time");
    assert_eq!(denied[1], yrs::sync::protocol::PERMISSION_DENIED);
    let stats = chorus_tests::http::get(server.addr, "/v1/stats")
        .await
        .expect("stats")
        .json();
    assert_eq!(stats["refused_missing_dependencies"], 1);
}

/// yhub#55: a stock client reconnects after 30 s without a message, so a document larger than
/// a piece (about 1 MiB) is answered as sync updates and then the step 2, each on its own. The
/// stock client applies them as they come and is synced with all of it.
#[tokio::test]
async fn a_document_larger_than_a_piece_reaches_a_stock_client_in_pieces() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use yrs::{GetString, ReadTxn, Text, Transact};
    let server = TestServer::start(|c| c.max_update_bytes = 16 << 20).await;
    // Each insert at the front is a block of its own: 300 blocks of 10 KB.
    let source = yrs::Doc::new();
    let text = source.get_or_insert_text("t");
    for i in 0..300u32 {
        let chunk = char::from(b'a' + (i % 26) as u8).to_string().repeat(10_000);
        text.insert(&mut source.transact_mut(), 0, &chunk);
    }
    let expected = text.get_string(&source.transact());
    let state = source
        .transact()
        .encode_state_as_update_v1(&yrs::StateVector::default());
    let posted = chorus_tests::http::post(server.addr, "/v1/docs/pieces/updates", &state)
        .await
        .expect("post");
    assert_eq!(posted.status, 200, "seeded");

    // What goes over the wire: sync updates of at most a piece, then one step 2.
    let (mut raw, _) = tokio_tungstenite::connect_async(format!("{}/pieces", server.yjs_base()))
        .await
        .expect("connect");
    raw.send(Message::Binary(vec![0, 0, 1, 0].into()))
        .await
        .expect("step 1");
    let mut updates = 0;
    tokio::time::timeout(DEADLINE, async {
        loop {
            match raw.next().await {
                Some(Ok(Message::Binary(b))) if b.starts_with(&[0, 2]) => {
                    assert!(b.len() <= 1 << 20, "a piece of {} bytes", b.len());
                    updates += 1;
                }
                Some(Ok(Message::Binary(b))) if b.starts_with(&[0, 1]) => break,
                Some(Ok(_)) => {}
                other => panic!("the answer ended early: {other:?}"),
            }
        }
    })
    .await
    .expect("the step 2 arrived");
    assert!(updates >= 2, "{updates} sync updates before the step 2");

    let mut stock = StockClient::spawn(&server.yjs_base(), "pieces").await;
    stock
        .wait_event(|e| e["event"] == "synced" && e["synced"] == true)
        .await;
    let have = stock.text().await;
    assert_eq!(have.len(), expected.len(), "synced with the whole document");
    assert!(have == expected, "the same text");
    stock.quit().await;
}
