//! The document API over plain HTTP: state reads, writes into the backplane, SSE and long-poll.

use super::ApiError;
use super::authorize::authorize;
use super::error::refused;
use crate::auth::{Access, AuthError, Principal};
use crate::connection::ConnContext;
use crate::connection::sse::{self, SseRequest};
use crate::doc::admit::{Refusal, Write, Writer};
use crate::doc::{DocError, DocHandle};
use crate::validate::Checked;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chorus_protocol::{CloseCode, DocId, Position, StreamId};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(super) async fn get_doc(
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
            super::position_header(position),
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

/// `POST /v1/docs/{doc}`: one update through the write door (see [`crate::doc::admit`]).
pub(super) async fn post_update(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    // Who is asking; whether they may write is the door's first step.
    let principal = match authorize(&ctx, &headers, &query, Some((&doc, Access::Read))) {
        Ok((principal, _)) => principal,
        Err(e) => {
            ctx.door
                .stats
                .refused_writes
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    // Checked before the document is loaded: garbage loads nothing.
    let checked = ctx.door.check(&principal, &doc, &body)?;
    // The document is made hot (and loaded) next: its size and state are known, and the
    // entry is applied before we answer, so a GET right after this POST sees it
    // (read-your-writes).
    let handle = loaded_owner(&ctx, &doc).await?;
    let (position, applied) =
        append_applied(&ctx, &principal, &handle, &doc, body, checked).await?;
    Ok((
        StatusCode::OK,
        axum::Json(json!({"position": position.to_string(), "applied": applied})),
    )
        .into_response())
}

/// The document's handle once this node has loaded it (within [`OWNER_WAIT`]).
pub(super) async fn loaded_owner(ctx: &ConnContext, doc: &DocId) -> Result<DocHandle, ApiError> {
    Ok(ctx
        .registry
        .with_owner(doc, |h| async move {
            tokio::time::timeout(OWNER_WAIT, h.wait_applied(StreamId::ZERO))
                .await
                .map_err(|_| DocError::Unavailable)??;
            Ok(h)
        })
        .await?)
}

/// Appends a checked update through the door, then waits (within [`OWNER_WAIT`]) for this
/// node to apply it, so a read right after sees it. Returns where it was appended and whether
/// it was applied here in time: late is not an error, the append is durable.
pub(super) async fn append_applied(
    ctx: &ConnContext,
    principal: &Principal,
    handle: &DocHandle,
    doc: &DocId,
    update: Bytes,
    checked: Checked,
) -> Result<(Position, bool), ApiError> {
    let write = Write {
        update,
        checked,
        seq: None,
    };
    let append = ctx
        .door
        .admit_checked(principal, handle, &mut Writer::request(), write)
        .await?;
    let position = append.await.result.map_err(Refusal::AppendFailed)?;
    let applied = tokio::time::timeout(
        OWNER_WAIT,
        ctx.registry
            .with_owner(doc, |h| async move { h.wait_applied(position.id).await }),
    )
    .await;
    // The owner answers waiters it gives up on (unloading, too many waiting) with where it
    // stands, so "applied" is checked here.
    let applied = matches!(applied, Ok(Ok(p)) if p.epoch == position.epoch && p.id >= position.id);
    if !applied {
        ctx.applied_late.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(doc = %doc, %position, "update appended but not applied here within {OWNER_WAIT:?}; answering without read-your-writes");
    }
    Ok((position, applied))
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
pub(super) async fn events(
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
pub(super) async fn poll_updates(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    let (principal, _) = authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
    let after = position_param(query.get("after").map(String::as_str), "after")?;
    // A poll never outlives the token it was authorized with: the node's sweep ends it with
    // 401 at the token's expiry (see `connection::sweep`), as it ends sockets with 4101.
    let wait = match query.get("wait").map(String::as_str) {
        None => sse::DEFAULT_WAIT,
        Some(w) => match w.parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => {
                std::time::Duration::from_secs_f64(s.min(sse::MAX_WAIT.as_secs_f64()))
            }
            _ => return Err(ApiError::BadWait),
        },
    };
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
    let position = answer.position.map(super::position_header);
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
    if let Some((name, value)) = position {
        h.insert(name, value);
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
