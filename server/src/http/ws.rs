//! WebSocket upgrades (`/v1/ws`, `/y/{doc}`): authorized here, then handed to [`connection::run`].

use super::ApiError;
use super::authorize::authorize;
use super::error::refused;
use crate::auth::Access;
use crate::connection::native::NativeSession;
use crate::connection::yjs::YjsSession;
use crate::connection::{self, ConnContext};
use crate::doc::DocError;
use crate::doc::outbox::Proto;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use chorus_protocol::DocId;
use std::collections::HashMap;
use std::sync::Arc;

/// Socket buffer sizes. tungstenite reads into a 128 KiB buffer per connection by default and
/// zero-fills it, so the whole buffer is resident: at 10k connections over a gigabyte of idle
/// memory. 1 KiB holds a keystroke update or a cursor move in one read (those are tens to a few
/// hundred bytes); larger messages still arrive, 1 KiB per read (the buffer grows to hold
/// the message). Measured with 5,000 idle y-websocket clients (with the task-size work in
/// `connection::run`): 2 KiB buffers 9.1 KB per connection, 1 KiB 8.1 KB (8 KiB and no task
/// work: 16.9 KB).
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 8 * 1024;

fn configure(ws: WebSocketUpgrade, ctx: &ConnContext) -> WebSocketUpgrade {
    let max = ctx.config.max_message_bytes;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // No separate cap here: the writer hands tungstenite one drained outbox (at most the
        // outbox budget, or one `synced` frame as large as the document) and waits for the
        // flush before draining again, so this buffer is already bounded by that. A cap would
        // make documents larger than it impossible to sync.
        .max_write_buffer_size(usize::MAX)
        .max_message_size(max)
        .max_frame_size(max)
}

/// Echoes the token subprotocol a browser offered (it fails the socket otherwise).
fn with_subprotocol(mut resp: Response, subprotocol: Option<String>) -> Response {
    if let Some(v) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    resp
}

pub(super) async fn native_ws(
    State(ctx): State<Arc<ConnContext>>,
    ip: Option<axum::Extension<crate::serve::ConnSlot>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // A bad token gets an HTTP status with a reason, never an upgraded socket.
    let (principal, subprotocol) = authorize(&ctx, &headers, &query, None)?;
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    let resp = configure(ws, &ctx).on_upgrade(move |socket| {
        let outbox = ctx.new_outbox(Proto::Native);
        let session = NativeSession::new(ctx.clone(), outbox.clone(), principal);
        // Upgraded sockets outlive the HTTP request: they are tracked here, not by axum.
        let tracker = ctx.tracker.clone();
        let run = connection::run(socket, ctx, slot, outbox, session);
        tracker.spawn(async move {
            run.await;
            // The socket counted against its address until now.
            drop(ip);
        });
        std::future::ready(())
    });
    Ok(with_subprotocol(resp, subprotocol))
}

pub(super) async fn yjs_ws(
    State(ctx): State<Arc<ConnContext>>,
    ip: Option<axum::Extension<crate::serve::ConnSlot>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let (principal, subprotocol) = authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
    // Told before the upgrade when it is clear already (a race past this check ends in a
    // close with 1011 after it, and the client reconnects).
    if !ctx.registry.has_room_for(&doc) {
        return Err(ApiError::NodeFull);
    }
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    let resp = configure(ws, &ctx).on_upgrade(move |socket| {
        let tracker = ctx.tracker.clone();
        // Boxed: the task keeps room for what it captures for its whole life.
        let mut socket = Box::new(socket);
        tracker.spawn(async move {
            // The socket counts against its address for as long as this task runs.
            let _ip = ip;
            let outbox = ctx.new_outbox(Proto::Yjs);
            let conn = outbox.conn;
            match ctx
                .registry
                .subscribe(&doc, conn, &outbox, &Default::default())
                .await
            {
                Ok(handle) => {
                    let session =
                        YjsSession::new(ctx.clone(), outbox.clone(), doc, handle, principal);
                    connection::run(*socket, ctx, slot, outbox, session).await;
                    return;
                }
                Err(e @ (DocError::Gone | DocError::Unavailable | DocError::Full)) => {
                    tracing::warn!(%doc, error = %e, "y-websocket client refused");
                }
            }
            outbox.close();
            ctx.forget_outbox(conn);
            let code = chorus_protocol::CloseCode::InternalError;
            let close = CloseFrame {
                code: code.code(),
                reason: code.reason().into(),
            };
            let _ = socket.send(Message::Close(Some(close))).await;
        });
        std::future::ready(())
    });
    Ok(with_subprotocol(resp, subprotocol))
}
