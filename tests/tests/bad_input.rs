//! Bad input gets a typed error or a documented close code; everyone else keeps working.

use chorus_protocol::{ClientFrame, ErrorCode, ServerFrame};
use chorus_tests::native::NativeClient;
use chorus_tests::{TestServer, http};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(c: &mut NativeClient, code: ErrorCode) -> ServerFrame {
    c.wait_for(|f| matches!(f, ServerFrame::Error { code: got, .. } if *got == code))
        .await
}

/// A healthy second client on the same node still works end to end.
async fn bystander_still_works(server: &TestServer, doc: &str) {
    let mut a = NativeClient::connect(&server.ws_url()).await;
    let mut b = NativeClient::connect(&server.ws_url()).await;
    a.subscribe_synced(doc).await;
    b.subscribe_synced(doc).await;
    let s = a.insert(doc, 0, "still fine").await;
    a.wait_acked(s).await;
    b.wait_text(doc, "still fine").await;
}

fn nested_any(depth: usize) -> Vec<u8> {
    let mut u = vec![1, 1, 1, 0, 0b0010_0000 | 8, 1, 1, b'm', 1, b'k', 1];
    for _ in 0..depth {
        u.extend([117, 1]);
    }
    u.extend([126, 0]);
    u
}

#[tokio::test]
async fn each_kind_of_bad_frame_gets_its_documented_answer() {
    let server = TestServer::start(|c| c.max_message_bytes = 64 * 1024).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;

    c.send_raw(Message::Binary(vec![0xc1, 0x00, 0xff].into()))
        .await;
    expect_error(&mut c, ErrorCode::BadFrame).await;

    let unknown = rmp_frame(serde_json::json!({"type": "teleport", "doc": "x"}));
    c.send_raw(Message::Binary(unknown.into())).await;
    expect_error(&mut c, ErrorCode::UnknownFrame).await;

    c.subscribe_from("../etc/passwd", None, None).await;
    expect_error(&mut c, ErrorCode::BadDocId).await;

    c.send(&ClientFrame::Update {
        doc: "notmine".into(),
        update: vec![0, 0],
        seq: Some(1),
    })
    .await;
    expect_error(&mut c, ErrorCode::NotSubscribed).await;

    c.subscribe_synced("bad").await;
    c.send(&ClientFrame::Update {
        doc: "bad".into(),
        update: vec![1, 2, 3, 4, 5],
        seq: Some(2),
    })
    .await;
    let e = expect_error(&mut c, ErrorCode::BadUpdate).await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(2), doc: Some(ref d), .. } if d == "bad"));

    // The stack-overflow crasher of yrs 0.28.1 (reliability.md §2) is refused, not decoded.
    c.send(&ClientFrame::Update {
        doc: "bad".into(),
        update: nested_any(7_000),
        seq: Some(3),
    })
    .await;
    let e = expect_error(&mut c, ErrorCode::BadUpdate).await;
    assert!(matches!(e, ServerFrame::Error { seq: Some(3), .. }));

    c.send(&ClientFrame::Subscribe {
        doc: "bad".into(),
        position: None,
        state_vector: Some(vec![0x80, 0xe5, 0x9a, 0x77]),
    })
    .await;
    expect_error(&mut c, ErrorCode::BadStateVector).await;

    c.send(&ClientFrame::Awareness {
        doc: "bad".into(),
        update: vec![1, 1, 1, 5, b'{', b'n', b'o', b'p', b'e'],
    })
    .await;
    expect_error(&mut c, ErrorCode::BadAwareness).await;

    // None of that reached the log: the document is still empty.
    let state = http::get(server.addr, "/v1/docs/bad").await.expect("GET");
    assert_eq!(state.body, vec![0, 0], "no rejected update was applied");

    // A text frame on the binary protocol closes with 1003.
    c.send_raw(Message::Text("hello".into())).await;
    assert_eq!(c.wait_closed().await, Some(1003));

    // An oversized message closes with 1009.
    let mut big = NativeClient::connect(&server.ws_url()).await;
    big.subscribe_synced("bad").await;
    big.send_raw(Message::Binary(vec![0u8; 100 * 1024].into()))
        .await;
    assert_eq!(big.wait_closed().await, Some(1009));

    bystander_still_works(&server, "bystander").await;
}

#[tokio::test]
async fn an_error_storm_is_closed_with_1008() {
    let server = TestServer::start(|_| {}).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    for _ in 0..200 {
        c.send_raw(Message::Binary(vec![0xc1].into())).await;
    }
    assert_eq!(c.wait_closed().await, Some(1008));
    bystander_still_works(&server, "storm").await;
}

#[tokio::test]
async fn too_many_documents_on_one_socket_is_refused_per_document() {
    let server = TestServer::start(|c| c.max_docs_per_connection = 2).await;
    let mut c = NativeClient::connect(&server.ws_url()).await;
    c.subscribe_synced("d1").await;
    c.subscribe_synced("d2").await;
    c.subscribe_from("d3", None, None).await;
    expect_error(&mut c, ErrorCode::TooManyDocs).await;
    // The two it holds keep working.
    let s = c.insert("d2", 0, "ok").await;
    c.wait_acked(s).await;
    let _ = c.drain_for(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn y_websocket_endpoint_refuses_bad_doc_ids_and_garbage() {
    let server = TestServer::start(|_| {}).await;
    let bad = http::get(server.addr, "/y/has%20space").await.expect("GET");
    assert_eq!(bad.status, 400);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/ok", server.yjs_base()))
        .await
        .expect("connect");
    use futures_util::{SinkExt, StreamExt};
    for _ in 0..100 {
        ws.send(Message::Binary(vec![0, 9, 9].into()))
            .await
            .expect("send");
    }
    let mut code = None;
    while let Some(Ok(m)) = tokio::time::timeout(chorus_tests::DEADLINE, ws.next())
        .await
        .expect("timely close")
    {
        if let Message::Close(c) = m {
            code = c.map(|c| u16::from(c.code));
            break;
        }
    }
    assert_eq!(code, Some(1008));
    bystander_still_works(&server, "ok").await;
}

fn rmp_frame(v: serde_json::Value) -> Vec<u8> {
    // MessagePack of an arbitrary map, as a third-party client would send it.
    let mut out = Vec::new();
    let map = v.as_object().expect("map");
    out.push(0x80 | map.len() as u8);
    for (k, v) in map {
        for s in [k.as_str(), v.as_str().expect("string values only")] {
            out.push(0xa0 | s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}
