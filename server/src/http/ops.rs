//! Operator endpoints beside the data flow: health, readiness, metrics, stats, revocation.

use super::ApiError;
use crate::connection::ConnContext;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;

#[derive(serde::Deserialize)]
pub(super) struct Revoke {
    sub: Option<String>,
    jti: Option<String>,
    /// Until when a revoked token id must be remembered (its `exp`); default a day.
    exp: Option<u64>,
}

/// `POST /v1/admin/revoke` with `Authorization: Bearer <admin key>`: revokes a subject or a
/// token id and closes the sockets it holds on this node with 4103.
pub(super) async fn revoke(
    State(ctx): State<Arc<ConnContext>>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<Revoke>,
) -> Result<Response, ApiError> {
    match super::authorize::admin(&ctx, &headers) {
        None => return Ok(StatusCode::NOT_FOUND.into_response()),
        Some(false) => return Err(ApiError::Admin),
        Some(true) => {}
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

pub(super) async fn healthz(State(ctx): State<Arc<ConnContext>>) -> Response {
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
pub(super) async fn stats(State(ctx): State<Arc<ConnContext>>) -> Response {
    let (total, largest) = ctx.outbox_bytes();
    let s = &ctx.stats;
    axum::Json(json!({
        "connections": ctx.open.load(Ordering::Relaxed),
        "refused_writes": ctx.door.stats.refused_writes.load(Ordering::Relaxed),
        "refused_missing_dependencies": ctx.door.stats.refused_missing_deps.load(Ordering::Relaxed),
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
            "writers": ctx.writers.load(Ordering::Relaxed),
        },
    }))
    .into_response()
}

/// Ready to take traffic: the backplane answers (embedded: always once open; Redis: a PING
/// within a second). Liveness is `/healthz`, which stays 200 while Redis is away.
pub(super) async fn readyz(State(ctx): State<Arc<ConnContext>>) -> Response {
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
pub(super) async fn metrics(State(ctx): State<Arc<ConnContext>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        crate::metrics::render(&ctx),
    )
        .into_response()
}
