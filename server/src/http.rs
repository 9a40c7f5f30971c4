//! HTTP face of a node: routes, WebSocket upgrades, SSE and long-poll, the document API, health.

use crate::auth::{Access, AuthError, Principal};
use crate::backplane::BackplaneError;
use crate::connection::Refused;
use crate::connection::native::NativeSession;
use crate::connection::sse::{self, SseRequest};
use crate::connection::yjs::YjsSession;
use crate::connection::{self, ConnContext};
use crate::doc::DocError;
use crate::doc::Readiness;
use crate::doc::outbox::Proto;
use crate::validate::{self, Rejected};
use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chorus_protocol::{CloseCode, DocId, DocIdError, Position, PositionParseError, StreamId};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tower_http::cors::{AllowOrigin, CorsLayer};

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
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("admin key missing or wrong")]
    Admin,
    #[error("the update builds on changes this document does not have")]
    MissingDependencies,
    #[error("bad position in {0}: {1}")]
    BadPosition(&'static str, PositionParseError),
    #[error("wait must be a number of seconds from 0 to {}", sse::MAX_WAIT.as_secs())]
    BadWait,
    #[error("{}", DocError::Full)]
    NodeFull,
    #[error("more than --max-api-requests-per-second requests from this address; retry in {}s", .0.as_secs().max(1))]
    RateLimited(std::time::Duration),
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
            ApiError::Auth(AuthError::Forbidden | AuthError::Origin) => {
                (StatusCode::FORBIDDEN, "forbidden")
            }
            ApiError::Auth(AuthError::Expired) => (StatusCode::UNAUTHORIZED, "token_expired"),
            ApiError::Auth(AuthError::Revoked) => (StatusCode::UNAUTHORIZED, "token_revoked"),
            ApiError::Auth(_) => (StatusCode::UNAUTHORIZED, "bad_token"),
            ApiError::Admin => (StatusCode::UNAUTHORIZED, "bad_admin_key"),
            ApiError::MissingDependencies => (StatusCode::CONFLICT, "missing_dependencies"),
            ApiError::BadPosition(..) => (StatusCode::BAD_REQUEST, "bad_position"),
            ApiError::BadWait => (StatusCode::BAD_REQUEST, "bad_wait"),
            ApiError::NodeFull => (StatusCode::SERVICE_UNAVAILABLE, "node_full"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        };
        let retry_after = match &self {
            ApiError::RateLimited(wait) => Some(wait.as_secs().max(1)),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        let mut resp = (
            status,
            axum::Json(json!({"error": code, "message": self.to_string()})),
        )
            .into_response();
        if let Some(v) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        match e {
            DocError::Full => ApiError::NodeFull,
            DocError::Gone | DocError::Unavailable => ApiError::Unavailable,
        }
    }
}

pub fn router(ctx: Arc<ConnContext>) -> Router {
    let body_limit = ctx.config.max_update_bytes + 1;
    let docs = Router::new()
        .route("/v1/docs/{doc}", get(get_doc))
        .route(
            "/v1/docs/{doc}/updates",
            post(post_update)
                .layer(DefaultBodyLimit::max(body_limit))
                .get(poll_updates),
        )
        .route("/v1/docs/{doc}/events", get(events))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            limit_api_rate,
        ));
    let mut router = Router::new()
        .route("/v1/ws", get(native_ws))
        .route("/y/{doc}", get(yjs_ws))
        .merge(docs)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/revoke", post(revoke))
        .route("/v1/stats", get(stats));
    if let Some(dir) = &ctx.config.static_dir
        && dir.is_dir()
    {
        router = router.fallback_service(tower_http::services::ServeDir::new(dir));
    }
    let cors = if ctx.config.allowed_origins.is_empty() {
        CorsLayer::new().allow_origin(AllowOrigin::any())
    } else {
        let origins = ctx
            .config
            .allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect::<Vec<_>>();
        CorsLayer::new().allow_origin(AllowOrigin::list(origins))
    }
    .allow_methods([Method::GET, Method::POST])
    .allow_headers([
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::HeaderName::from_static("last-event-id"),
    ])
    .expose_headers([
        header::HeaderName::from_static("x-chorus-position"),
        header::HeaderName::from_static("x-chorus-sync"),
    ]);
    router.layer(cors).with_state(ctx)
}

/// `--max-api-requests-per-second`: a token per request from the client's address, before
/// the handler runs (a GET may load a document; a request refused here costs nothing).
async fn limit_api_rate(
    State(ctx): State<Arc<ConnContext>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ip = req
        .extensions()
        .get::<crate::serve::ConnSlot>()
        .map(crate::serve::ConnSlot::ip);
    if let Some(ip) = ip
        && let Err(wait) = ctx.api_rate.check(ip)
    {
        return ApiError::RateLimited(wait).into_response();
    }
    next.run(req).await
}

#[derive(serde::Deserialize)]
struct Revoke {
    sub: Option<String>,
    jti: Option<String>,
    /// Until when a revoked token id must be remembered (its `exp`); default a day.
    exp: Option<u64>,
}

/// `POST /v1/admin/revoke` with `Authorization: Bearer <admin key>`: revokes a subject or a
/// token id and closes the sockets it holds on this node with 4103.
async fn revoke(
    State(ctx): State<Arc<ConnContext>>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<Revoke>,
) -> Result<Response, ApiError> {
    let Some(key) = &ctx.config.admin_key else {
        return Ok(StatusCode::NOT_FOUND.into_response());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        return Err(ApiError::Admin);
    }
    if req.sub.is_none() && req.jti.is_none() {
        return Ok((
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "nothing_to_revoke"})),
        )
            .into_response());
    }
    let rev = crate::backplane::Revocation {
        sub: req.sub,
        jti: req.jti,
        exp: req.exp,
        at: crate::auth::now_secs(),
    };
    // Applied here first, so this node is safe even if the other nodes cannot be told.
    let closed = ctx.revoke(&rev);
    match ctx.registry.backplane().publish_revocation(rev).await {
        Ok(()) => Ok(axum::Json(json!({"closed": closed, "propagated": true})).into_response()),
        Err(e) => {
            tracing::error!(error = %e, "revocation applied on this node but not propagated");
            Ok((
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
                axum::Json(json!({
                    "error": "not_propagated",
                    "message": format!("revoked on this node only; the other nodes could not be told ({e}); retry"),
                    "closed": closed,
                    "propagated": false,
                })),
            )
                .into_response())
        }
    }
}

/// Compares secrets without an early exit that would leak how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

/// The token a request carries: `?token=`, `Authorization: Bearer`, or (for browsers, which
/// cannot set headers on a WebSocket) a `chorus-token.<jwt>` subprotocol, which the answer
/// must echo.
struct Presented {
    token: Option<String>,
    subprotocol: Option<String>,
}

fn presented(headers: &HeaderMap, query: &HashMap<String, String>) -> Presented {
    let subprotocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .map(str::trim)
                .find(|p| p.starts_with(TOKEN_PROTOCOL))
        })
        .map(str::to_owned);
    let token = query
        .get("token")
        .cloned()
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        })
        .or_else(|| {
            subprotocol
                .as_ref()
                .map(|p| p[TOKEN_PROTOCOL.len()..].to_owned())
        });
    Presented { token, subprotocol }
}

const TOKEN_PROTOCOL: &str = "chorus-token.";

/// Origin allow-list for browsers; requests without `Origin` (non-browser clients) pass.
fn check_origin(ctx: &ConnContext, headers: &HeaderMap) -> Result<(), ApiError> {
    let allowed = &ctx.config.allowed_origins;
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) if !allowed.is_empty() && !allowed.iter().any(|a| a == origin) => {
            Err(ApiError::Auth(AuthError::Origin))
        }
        _ => Ok(()),
    }
}

/// Verifies the caller and, for a document, that the token grants at least `need`.
fn authorize(
    ctx: &ConnContext,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    doc: Option<(&DocId, Access)>,
) -> Result<(Principal, Option<String>), ApiError> {
    check_origin(ctx, headers)?;
    let p = presented(headers, query);
    let principal = ctx.auth.verify(p.token.as_deref())?;
    if let Some((doc, need)) = doc
        && principal.access(doc).is_none_or(|a| a < need)
    {
        return Err(ApiError::Auth(AuthError::Forbidden));
    }
    Ok((principal, p.subprotocol))
}

/// Echoes the token subprotocol a browser offered (it fails the socket otherwise).
fn with_subprotocol(mut resp: Response, subprotocol: Option<String>) -> Response {
    if let Some(v) = subprotocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    resp
}

async fn native_ws(
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

async fn yjs_ws(
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

async fn get_doc(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
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

/// How long a POST waits for this node's copy of the document: to be loaded before the write
/// is admitted (past it: 503, nothing was written, retry), and to apply the appended update
/// before answering (read-your-writes). The second wait ends in a 200 either way: the update is
/// durable once appended, only a GET right after it may not show it yet. Such a reader is
/// stuck (Redis unreachable for reads, a stalled reader) or far behind; its own
/// deadlines and rechecks bring the document up to date, the client is not kept waiting.
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn post_update(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let principal = match authorize(&ctx, &headers, &query, Some((&doc, Access::Write))) {
        Ok((principal, _)) => principal,
        Err(e) => {
            ctx.refused_writes.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let checked =
        validate::check_update(&body, ctx.config.max_update_bytes).map_err(|e| match e {
            Rejected::TooLarge(..) | Rejected::TooManyClients(..) => ApiError::TooLarge(e),
            e => ApiError::BadUpdate(e),
        })?;
    // The document is made hot (and loaded) first: its size and state are known, and the
    // entry is applied before we answer, so a GET right after this POST sees it
    // (read-your-writes).
    let deps = &checked.deps;
    let wait = ctx.config.missing_deps_wait;
    let (size, ready) = ctx
        .registry
        .with_owner(&doc, |h| async move {
            tokio::time::timeout(OWNER_WAIT, h.wait_applied(StreamId::ZERO))
                .await
                .map_err(|_| DocError::Unavailable)??;
            let ready = h.wait_ready(deps, None, None, wait).await == Readiness::Met;
            Ok((h.approx_size(), ready))
        })
        .await?;
    if size + body.len() > ctx.config.max_document_bytes {
        return Err(ApiError::DocumentTooLarge(ctx.config.max_document_bytes));
    }
    if !ready {
        ctx.refused_missing_deps.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::MissingDependencies);
    }
    // Checked after the waits: the token may have been revoked (or expired) meanwhile.
    ctx.admit_write(&principal)?;
    let position = ctx.registry.backplane().append(&doc, body, None).await?;
    let applied = tokio::time::timeout(
        OWNER_WAIT,
        ctx.registry
            .with_owner(&doc, |h| async move { h.wait_applied(position.id).await }),
    )
    .await;
    // The owner answers waiters it gives up on (unloading, too many waiting) with where it
    // stands, so "applied" is checked here. A failed or cut-off wait is late, not an error:
    // the append succeeded, so the answer is 200 either way.
    let applied = matches!(applied, Ok(Ok(p)) if p.epoch == position.epoch && p.id >= position.id);
    if !applied {
        ctx.applied_late.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(doc = %doc, %position, "update appended but not applied here within {OWNER_WAIT:?}; answering without read-your-writes");
    }
    Ok((
        StatusCode::OK,
        axum::Json(json!({"position": position.to_string(), "applied": applied})),
    )
        .into_response())
}

/// `after=` or `Last-Event-ID`: absent or empty means "from nothing" (full state).
fn position_param(value: Option<&str>, name: &'static str) -> Result<Option<Position>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|e| ApiError::BadPosition(name, e)),
    }
}

/// `GET /v1/docs/{doc}/events`: Server-Sent Events (see [`sse`]). Resumes after
/// `Last-Event-ID` (sent by a reconnecting `EventSource` by itself) or `?after=`.
async fn events(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let (principal, _) = authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let from = match last_event_id {
        Some(v) => position_param(Some(v), "Last-Event-ID")?,
        None => position_param(query.get("after").map(String::as_str), "after")?,
    };
    let presence = query
        .get("presence")
        .is_some_and(|v| v == "1" || v == "true");
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    let req = SseRequest {
        doc,
        principal,
        from,
        presence,
    };
    let rx = sse::start_sse(ctx, slot, req).await?;
    let body =
        axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
        }));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            // nginx: do not buffer this response even where proxy_buffering is on.
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response())
}

/// `GET /v1/docs/{doc}/updates?after=POSITION&wait=SECONDS`: long-poll (see [`sse`]).
/// 200 with the merged update, `X-Chorus-Position` and `X-Chorus-Sync: replay|full`;
/// 204 with the unchanged position when nothing came within the wait.
async fn poll_updates(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let (principal, _) = authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
    let after = position_param(query.get("after").map(String::as_str), "after")?;
    let mut wait = match query.get("wait").map(String::as_str) {
        None => sse::DEFAULT_WAIT,
        Some(w) => match w.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => {
                std::time::Duration::from_secs_f64(s.min(sse::MAX_WAIT.as_secs_f64()))
            }
            _ => return Err(ApiError::BadWait),
        },
    };
    // A poll never outlives the token it was authorized with.
    if let Some(exp) = principal.exp {
        let left = exp.saturating_sub(crate::auth::now_secs());
        wait = wait.min(std::time::Duration::from_secs(left));
    }
    let slot = match ctx.admit() {
        Ok(slot) => slot,
        Err(r) => return Ok(refused(r)),
    };
    let answer = sse::long_poll(ctx, slot, doc, principal, after, wait).await?;
    match answer.ended {
        None => {}
        Some(CloseCode::Revoked) => return Err(ApiError::Auth(AuthError::Revoked)),
        Some(CloseCode::TokenExpired) => return Err(ApiError::Auth(AuthError::Expired)),
        Some(_) => return Err(ApiError::Unavailable),
    }
    let position = answer
        .position
        .map(|p| p.to_string())
        .and_then(|p| HeaderValue::from_str(&p).ok());
    let mut resp = match answer.update {
        Some(update) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            update,
        )
            .into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    };
    let h = resp.headers_mut();
    // The answer for a given `after` grows as the document does: never safe to cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(p) = position {
        h.insert(header::HeaderName::from_static("x-chorus-position"), p);
    }
    if resp.status() == StatusCode::OK {
        let sync = if answer.full { "full" } else { "replay" };
        resp.headers_mut().insert(
            header::HeaderName::from_static("x-chorus-sync"),
            HeaderValue::from_static(sync),
        );
    }
    Ok(resp)
}

async fn healthz(State(ctx): State<Arc<ConnContext>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "backplane": ctx.registry.backplane().name(),
        "auth": if ctx.auth.enabled() { "on" } else { "OFF: anyone may read and write every document" },
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
        "refused_writes": ctx.refused_writes.load(Ordering::Relaxed),
        "refused_missing_dependencies": ctx.refused_missing_deps.load(Ordering::Relaxed),
        "writes_applied_late": ctx.applied_late.load(Ordering::Relaxed),
        "refused_awareness": ctx.registry.refused_awareness(),
        "refused_per_ip": ctx.per_ip.refused.load(Ordering::Relaxed),
        "refused_api_requests": ctx.api_rate.refused.load(Ordering::Relaxed),
        "refused_hot_documents": ctx.registry.refused_loads(),
        "hot_documents": ctx.registry.hot_documents(),
        "outbox": {
            "pending_bytes": total,
            "largest_pending_bytes": largest,
            "budget_bytes": ctx.config.outbox_bytes,
            "sheds": s.sheds.load(Ordering::Relaxed),
            "replaced_answers": s.replaced_answers.load(Ordering::Relaxed),
            "merged_frames": s.merged_frames.load(Ordering::Relaxed),
            "merged_updates": s.merged_updates.load(Ordering::Relaxed),
            "stalled": s.stalled.load(Ordering::Relaxed),
            "slow_closes": s.slow_closes.load(Ordering::Relaxed),
            "writes": s.writes.load(Ordering::Relaxed),
            "frames_written": s.frames_written.load(Ordering::Relaxed),
        },
    }))
    .into_response()
}

/// Ready to take traffic: the backplane answers (embedded: always once open; Redis: a PING
/// within a second). Liveness is `/healthz`, which stays 200 while Redis is away.
async fn readyz(State(ctx): State<Arc<ConnContext>>) -> Response {
    match ctx.registry.backplane().ping().await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "reason": e.to_string()})),
        )
            .into_response(),
    }
}

/// Prometheus text exposition of this node (see [`crate::metrics`]).
async fn metrics(State(ctx): State<Arc<ConnContext>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(&ctx),
    )
        .into_response()
}
