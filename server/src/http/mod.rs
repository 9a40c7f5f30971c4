//! HTTP face of a node: routes, WebSocket upgrades, SSE and long-poll, the document API, health.
//!
//! The router lives here; the handlers sit beside it by what they serve:
//! - `ws`: the WebSocket upgrades, handed on to [`crate::connection`];
//! - `docs`: the document API, SSE and long-poll;
//! - `inspect`: the document as JSON and the inspector (decodes off the owner);
//! - `ops`: health, readiness, metrics, stats and revocation, for operators;
//! - `authorize`: origin and token checks shared by the first two;
//! - `error`: [`ApiError`] and connection refusals, as HTTP statuses;
//! - `versions`: version history (keep, list, read, delete, restore).

mod authorize;
mod docs;
mod error;
mod inspect;
mod ops;
mod upgrade;
mod versions;
mod ws;

pub use error::ApiError;

use crate::connection::ConnContext;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use docs::{events, get_doc, poll_updates, post_update};
use ops::{healthz, metrics, readyz, revoke, stats};
use std::sync::Arc;
use tower_http::cors::{AllowOrigin, CorsLayer};
use ws::{native_ws, yjs_ws};

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
        .route("/v1/docs/{doc}/json", get(inspect::get_json))
        .route("/v1/docs/{doc}/inspect", get(inspect::inspect))
        .route(
            "/v1/docs/{doc}/versions",
            post(versions::create)
                .layer(DefaultBodyLimit::max(versions::CREATE_BODY_LIMIT))
                .get(versions::list),
        )
        .route(
            "/v1/docs/{doc}/versions/{id}",
            get(versions::get).delete(versions::delete),
        )
        .route(
            "/v1/docs/{doc}/versions/{id}/restore",
            post(versions::restore),
        )
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
    .allow_methods([Method::GET, Method::POST, Method::DELETE])
    .allow_headers([
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::HeaderName::from_static("last-event-id"),
    ])
    .expose_headers([POSITION, header::HeaderName::from_static("x-chorus-sync")]);
    router.layer(cors).with_state(ctx)
}

/// `X-Chorus-Position`, which every document answer carries: where the document stood.
pub(super) const POSITION: header::HeaderName =
    header::HeaderName::from_static("x-chorus-position");

/// The [`POSITION`] header for `p` (a position prints as ASCII, so it always is a value).
pub(super) fn position_header(p: chorus_protocol::Position) -> (header::HeaderName, HeaderValue) {
    let value = HeaderValue::from_str(&p.to_string()).unwrap_or(HeaderValue::from_static(""));
    (POSITION, value)
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
