//! HTTP face of a node: routes, the WebSocket upgrades, the document API and health.

use crate::backplane::BackplaneError;
use crate::connection::Refused;
use crate::connection::native::NativeSession;
use crate::connection::yjs::YjsSession;
use crate::connection::{self, ConnContext};
use crate::doc::DocError;
use crate::doc::outbox::Proto;
use crate::validate::{self, Rejected};
use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chorus_protocol::{DocId, DocIdError, StreamId};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Errors of the HTTP API, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    BadDocId(#[from] DocIdError),
    #[error("update rejected: {0}")]
    BadUpdate(Rejected),
    #[error("update too large: {0}")]
    TooLarge(Rejected),
    #[error("the log could not take the update; retry: {0}")]
    Append(#[from] BackplaneError),
    #[error("the document is unavailable; retry")]
    Unavailable,
    #[error("the document reached the {0}-byte limit and takes no more updates")]
    DocumentTooLarge(usize),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadDocId(_) => (StatusCode::BAD_REQUEST, "bad_doc_id"),
            ApiError::BadUpdate(_) => (StatusCode::BAD_REQUEST, "bad_update"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Append(_) => (StatusCode::SERVICE_UNAVAILABLE, "append_failed"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::DocumentTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "document_too_large"),
        };
        let mut resp = (
            status,
            axum::Json(json!({"error": code, "message": self.to_string()})),
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<DocError> for ApiError {
    fn from(_: DocError) -> Self {
        ApiError::Unavailable
    }
}

pub fn router(ctx: Arc<ConnContext>) -> Router {
    let body_limit = ctx.config.max_update_bytes + 1;
    let mut router = Router::new()
        .route("/v1/ws", get(native_ws))
        .route("/y/{doc}", get(yjs_ws))
        .route("/v1/docs/{doc}", get(get_doc))
        .route(
            "/v1/docs/{doc}/updates",
            post(post_update).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/healthz", get(healthz))
        .route("/v1/stats", get(stats));
    if let Some(dir) = &ctx.config.static_dir
        && dir.is_dir()
    {
        router = router.fallback_service(tower_http::services::ServeDir::new(dir));
    }
    router.with_state(ctx)
}

/// Socket buffer sizes. tungstenite reads into a 128 KiB buffer per connection by default,
/// which at 10k connections is over a gigabyte of mostly idle memory; 8 KiB holds any typical
/// CRDT update frame, and larger messages still arrive (the buffer grows per read).
const READ_BUFFER: usize = 8 * 1024;
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

fn refused(r: Refused) -> Response {
    let (status, retry, code) = match r {
        Refused::RateLimited(wait) => (
            StatusCode::TOO_MANY_REQUESTS,
            wait.as_secs().max(1),
            "rate_limited",
        ),
        Refused::Full => (StatusCode::SERVICE_UNAVAILABLE, 5, "too_many_connections"),
        Refused::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, 1, "shutting_down"),
    };
    let mut resp = (status, axum::Json(json!({"error": code}))).into_response();
    if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn native_ws(State(ctx): State<Arc<ConnContext>>, ws: WebSocketUpgrade) -> Response {
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return refused(r),
    };
    configure(ws, &ctx).on_upgrade(move |socket| {
        let outbox = ctx.new_outbox(Proto::Native);
        let session = NativeSession::new(ctx.registry.clone(), ctx.config.clone(), outbox.clone());
        // Upgraded sockets outlive the HTTP request: they are tracked here, not by axum.
        let tracker = ctx.tracker.clone();
        tracker.spawn(connection::run(socket, ctx, slot, outbox, session));
        std::future::ready(())
    })
}

async fn yjs_ws(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    Ok(configure(ws, &ctx).on_upgrade(move |mut socket| {
        let tracker = ctx.tracker.clone();
        tracker.spawn(async move {
            let outbox = ctx.new_outbox(Proto::Yjs);
            let conn = outbox.conn;
            match ctx
                .registry
                .subscribe(&doc, conn, &outbox, &Default::default())
                .await
            {
                Ok(handle) => {
                    let session = YjsSession::new(
                        ctx.registry.clone(),
                        ctx.config.clone(),
                        outbox.clone(),
                        doc,
                        handle,
                    );
                    connection::run(socket, ctx, slot, outbox, session).await;
                    return;
                }
                Err(DocError::Gone | DocError::Unavailable) => {}
            }
            tracing::warn!(%doc, "y-websocket client refused: document unavailable");
            let code = chorus_protocol::CloseCode::InternalError;
            let close = CloseFrame {
                code: code.code(),
                reason: code.reason().into(),
            };
            let _ = socket.send(Message::Close(Some(close))).await;
        });
        std::future::ready(())
    }))
}

async fn get_doc(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let (state, position) = ctx
        .registry
        .with_owner(&doc, |h| async move { h.state().await })
        .await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static("x-chorus-position"),
                HeaderValue::from_str(&position.to_string())
                    .unwrap_or(HeaderValue::from_static("")),
            ),
        ],
        state,
    )
        .into_response())
}

async fn post_update(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    validate::check_update(&body, ctx.config.max_update_bytes).map_err(|e| match e {
        Rejected::TooLarge(..) => ApiError::TooLarge(e),
        e => ApiError::BadUpdate(e),
    })?;
    // The document is made hot (and loaded) first: its size is known, and the entry is
    // applied before we answer, so a GET right after this POST sees it (read-your-writes).
    let size = ctx
        .registry
        .with_owner(&doc, |h| async move {
            h.wait_applied(StreamId::ZERO).await?;
            Ok(h.approx_size())
        })
        .await?;
    if size + body.len() > ctx.config.max_document_bytes {
        return Err(ApiError::DocumentTooLarge(ctx.config.max_document_bytes));
    }
    let position = ctx.registry.backplane().append(&doc, body, None).await?;
    ctx.registry
        .with_owner(&doc, |h| async move { h.wait_applied(position.id).await })
        .await?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({"position": position.to_string()})),
    )
        .into_response())
}

async fn healthz(State(ctx): State<Arc<ConnContext>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "backplane": ctx.registry.backplane().name(),
        "connections": ctx.open.load(Ordering::Relaxed),
        "hot_documents": ctx.registry.hot_documents(),
    }))
    .into_response()
}

/// Live figures for operators and tests (Prometheus metrics come with /metrics).
async fn stats(State(ctx): State<Arc<ConnContext>>) -> Response {
    let (total, largest) = ctx.outbox_bytes();
    let s = &ctx.stats;
    axum::Json(json!({
        "connections": ctx.open.load(Ordering::Relaxed),
        "hot_documents": ctx.registry.hot_documents(),
        "outbox": {
            "pending_bytes": total,
            "largest_pending_bytes": largest,
            "budget_bytes": ctx.config.outbox_bytes,
            "sheds": s.sheds.load(Ordering::Relaxed),
            "merged_frames": s.merged_frames.load(Ordering::Relaxed),
            "merged_updates": s.merged_updates.load(Ordering::Relaxed),
            "stalled": s.stalled.load(Ordering::Relaxed),
            "slow_closes": s.slow_closes.load(Ordering::Relaxed),
        },
    }))
    .into_response()
}
