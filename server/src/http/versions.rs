//! The version API (`/v1/docs/{doc}/versions`): keep, list, read and delete versions in the
//! snapshot store, and restore one by appending, through the write door, the update that takes
//! the document back to it (see [`crate::doc::restore`]).

use super::ApiError;
use super::authorize::authorize;
use super::docs::{append_applied, loaded_owner};
use crate::auth::Access;
use crate::connection::ConnContext;
use crate::doc::DocError;
use crate::doc::admit::Refusal;
use crate::doc::restore::{RestoreError, restore_update};
use crate::storage::StoreError;
use crate::storage::versions::{
    BadVersionId, BadVersionName, MAX_NAMED_PER_DOCUMENT, VersionId, VersionKind, VersionMeta,
    check_name, prune_auto,
};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chorus_protocol::{DocId, Position};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Largest body `POST .../versions` takes (`{"name": ...}`).
pub(super) const CREATE_BODY_LIMIT: usize = 4096;

/// A restore decodes two copies of a document (up to `--max-document-bytes` each) while it
/// runs, so it takes one of the node's decode permits (`ConnContext::decodes`, shared with
/// `/json` and `/inspect`); past them it waits its turn for up to [`RESTORE_WAIT`], then
/// answers 503.
const RESTORE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    BadId(#[from] BadVersionId),
    #[error(transparent)]
    BadName(#[from] BadVersionName),
    #[error("the body must be empty or JSON like {{\"name\": \"...\"}}")]
    BadBody,
    #[error("no such version of this document")]
    NotFound,
    #[error("the version store failed: {0}")]
    Store(#[from] StoreError),
    #[error(
        "the restore update would be {bytes} bytes, over --max-update-bytes ({limit}); clients would refuse it"
    )]
    RestoreTooLarge { bytes: usize, limit: usize },
    #[error("the restore could not be computed: {0}")]
    Restore(#[from] RestoreError),
    #[error("too many restores running on this node; retry")]
    Busy,
    #[error(
        "this document has {MAX_NAMED_PER_DOCUMENT} named versions, the most it may; delete some first"
    )]
    TooMany,
}

impl From<DocError> for VersionError {
    fn from(e: DocError) -> Self {
        VersionError::Api(e.into())
    }
}

impl From<Refusal> for VersionError {
    fn from(e: Refusal) -> Self {
        VersionError::Api(e.into())
    }
}

impl IntoResponse for VersionError {
    fn into_response(self) -> Response {
        let ours = match self {
            // The document API's own errors answer as they do there.
            VersionError::Api(e) => return e.into_response(),
            ours => ours,
        };
        let (status, code) = match &ours {
            VersionError::Api(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            VersionError::BadId(_) => (StatusCode::BAD_REQUEST, "bad_version_id"),
            VersionError::BadName(_) => (StatusCode::BAD_REQUEST, "bad_version_name"),
            VersionError::BadBody => (StatusCode::BAD_REQUEST, "bad_body"),
            VersionError::NotFound => (StatusCode::NOT_FOUND, "version_not_found"),
            VersionError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_failed"),
            VersionError::RestoreTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "restore_too_large")
            }
            VersionError::Restore(_) => (StatusCode::UNPROCESSABLE_ENTITY, "restore_failed"),
            VersionError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "restore_busy"),
            VersionError::TooMany => (StatusCode::CONFLICT, "too_many_versions"),
        };
        let mut resp = (
            status,
            axum::Json(json!({"error": code, "message": ours.to_string()})),
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn doc_for(
    ctx: &ConnContext,
    doc: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    need: Access,
) -> Result<(DocId, crate::auth::Principal), VersionError> {
    let doc = DocId::parse(doc).map_err(ApiError::from)?;
    let (principal, _) = authorize(ctx, headers, query, Some((&doc, need)))?;
    Ok((doc, principal))
}

fn meta_json(meta: &VersionMeta) -> serde_json::Value {
    serde_json::to_value(meta).unwrap_or_default()
}

/// `POST /v1/docs/{doc}/versions` with an optional `{"name": "..."}`: keeps the current state.
pub(super) async fn create(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, VersionError> {
    let (doc, _) = doc_for(&ctx, &doc, &headers, &query, Access::Write)?;
    let name = parse_name(&body)?;
    let store = ctx.registry.snapshot_store();
    if name.is_some() {
        let named = store.list_versions(&doc).await?;
        let named = named.iter().filter(|m| m.kind == VersionKind::Named);
        if named.count() >= MAX_NAMED_PER_DOCUMENT {
            return Err(VersionError::TooMany);
        }
    }
    let (state, position) = ctx
        .registry
        .with_owner(&doc, |h| async move { h.state().await })
        .await?;
    let meta = VersionMeta::new(position, name, state.len());
    store
        .put_version(&doc, meta.clone(), Bytes::from(state))
        .await?;
    if meta.kind == VersionKind::Auto {
        // Unnamed versions count with the automatic ones: bounded by `--keep-versions` too (at
        // least the one just kept stays).
        prune_auto(store.as_ref(), &doc, ctx.config.keep_versions.max(1)).await?;
    }
    Ok((StatusCode::CREATED, axum::Json(meta_json(&meta))).into_response())
}

fn parse_name(body: &[u8]) -> Result<Option<String>, VersionError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        name: Option<String>,
    }
    let create: Create = serde_json::from_slice(body).map_err(|_| VersionError::BadBody)?;
    if let Some(name) = &create.name {
        check_name(name)?;
    }
    Ok(create.name)
}

/// `GET /v1/docs/{doc}/versions`: every version's metadata, newest first.
pub(super) async fn list(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, VersionError> {
    let (doc, _) = doc_for(&ctx, &doc, &headers, &query, Access::Read)?;
    let versions = ctx.registry.snapshot_store().list_versions(&doc).await?;
    let list: Vec<_> = versions.iter().map(meta_json).collect();
    Ok(axum::Json(list).into_response())
}

/// `GET /v1/docs/{doc}/versions/{id}`: the version as one yrs v1 update.
pub(super) async fn get(
    State(ctx): State<Arc<ConnContext>>,
    Path((doc, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, VersionError> {
    let (doc, _) = doc_for(&ctx, &doc, &headers, &query, Access::Read)?;
    let id = VersionId::parse(&id)?;
    let (meta, state) = ctx
        .registry
        .snapshot_store()
        .get_version(&doc, &id)
        .await?
        .ok_or(VersionError::NotFound)?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            super::position_header(meta.position),
        ],
        state,
    )
        .into_response())
}

/// `DELETE /v1/docs/{doc}/versions/{id}`.
pub(super) async fn delete(
    State(ctx): State<Arc<ConnContext>>,
    Path((doc, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, VersionError> {
    let (doc, _) = doc_for(&ctx, &doc, &headers, &query, Access::Write)?;
    let id = VersionId::parse(&id)?;
    if !ctx
        .registry
        .snapshot_store()
        .delete_version(&doc, &id)
        .await?
    {
        return Err(VersionError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/docs/{doc}/versions/{id}/restore`: appends the update that makes the document's
/// content the version's; `200 {"position"}` once appended (and, within a bound, applied here).
pub(super) async fn restore(
    State(ctx): State<Arc<ConnContext>>,
    Path((doc, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, VersionError> {
    let (doc, principal) = doc_for(&ctx, &doc, &headers, &query, Access::Write)?;
    let id = VersionId::parse(&id)?;
    // Before the version is read: a waiting or refused restore holds nothing. Waiters are
    // bounded by the node's open HTTP connections, and each waits at most RESTORE_WAIT.
    let _permit = tokio::time::timeout(RESTORE_WAIT, ctx.decodes.clone().acquire_owned())
        .await
        .map_err(|_| VersionError::Busy)?
        .map_err(|_| VersionError::Busy)?;
    let (_, version) = ctx
        .registry
        .snapshot_store()
        .get_version(&doc, &id)
        .await?
        .ok_or(VersionError::NotFound)?;
    let handle = loaded_owner(&ctx, &doc).await?;
    let (current, at) = handle.state().await?;
    let computed = ctx
        .tracker
        .spawn_blocking(move || restore_update(&version, &current))
        .await
        .map_err(|_| RestoreError::Panicked)??;
    let Some(update) = computed else {
        return Ok(restored(at, 0));
    };
    let limit = ctx.config.max_update_bytes;
    if update.len() > limit {
        return Err(VersionError::RestoreTooLarge {
            bytes: update.len(),
            limit,
        });
    }
    let update = Bytes::from(update);
    let bytes = update.len();
    let checked = ctx.door.check(&principal, &doc, &update)?;
    let (position, _) = append_applied(&ctx, &principal, &handle, &doc, update, checked).await?;
    tracing::info!(doc = %doc, version = %id, %position, bytes, "version restored");
    Ok(restored(position, bytes))
}

fn restored(position: Position, bytes: usize) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"position": position.to_string(), "bytes": bytes})),
    )
        .into_response()
}
