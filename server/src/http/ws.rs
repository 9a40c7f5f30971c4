//! WebSocket upgrades (`/v1/ws`, `/y/{doc}`): authorized here, then handed to [`connection::run`].

use super::ApiError;
use super::authorize::authorize;
use super::error::refused;
use super::upgrade::{NotUpgrade, WsUpgrade};
use crate::auth::Access;
use crate::connection::native::NativeSession;
use crate::connection::yjs::YjsSession;
use crate::connection::{self, ConnContext, wires};
use crate::doc::DocError;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chorus_protocol::DocId;
use std::collections::HashMap;
use std::sync::Arc;

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
    ws: WsUpgrade,
) -> Result<Response, ApiError> {
    // A bad token gets an HTTP status with a reason, never an upgraded socket.
    let (principal, subprotocol) = authorize(&ctx, &headers, &query, None)?;
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    // Upgraded sockets outlive the HTTP request: they are tracked by the node, not by axum.
    let tracker = ctx.tracker.clone();
    let resp = ws.on_upgrade(&tracker, move |socket| {
        let outbox = ctx.new_outbox(&wires::NATIVE);
        let session = NativeSession::new(ctx.clone(), outbox.clone(), principal);
        let run = connection::run(socket, ctx, slot, outbox, session);
        async move {
            run.await;
            // The socket counted against its address until now.
            drop(ip);
        }
    });
    Ok(with_subprotocol(resp, subprotocol))
}

pub(super) async fn yjs_ws(
    State(ctx): State<Arc<ConnContext>>,
    ip: Option<axum::Extension<crate::serve::ConnSlot>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WsUpgrade, NotUpgrade>,
) -> Result<Response, ApiError> {
    // A bad name is the clearer answer, even to a request that is no handshake either.
    let doc = DocId::parse(&doc)?;
    let ws = match ws {
        Ok(ws) => ws,
        Err(not) => return Ok(not.into_response()),
    };
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
    let tracker = ctx.tracker.clone();
    let resp = ws.on_upgrade(&tracker, move |socket| {
        // Boxed: the task keeps room for what it captures for its whole life.
        let socket = Box::new(socket);
        async move {
            // The socket counts against its address for as long as this task runs.
            let _ip = ip;
            let outbox = ctx.new_outbox(&wires::Y_WEBSOCKET);
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
            let close = connection::socket::close_frame(chorus_protocol::CloseCode::InternalError);
            let stall = std::time::Duration::from_secs(1);
            let _ = socket.socket.write_all(vec![close], stall).await;
            socket.socket.shutdown_write();
        }
    });
    Ok(with_subprotocol(resp, subprotocol))
}
