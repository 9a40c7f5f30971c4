//! Read side of the document API for backends and operators: `GET …/json` (the root types as
//! data) and `GET …/inspect` (what a document is made of, and how this node holds it).
//!
//! Both decode a whole document, which the owner must not do on its task (a large document
//! takes tens of milliseconds per megabyte): the owner hands over its encoded state, and the
//! decode runs on a blocking thread under the node's decode permits (`ConnContext::decodes`),
//! so a client asking for a large document a thousand times a second queues behind two
//! decodes and then gets 503, instead of taking the node's memory.

use super::ApiError;
use super::authorize::{admin, authorize};
use crate::auth::Access;
use crate::connection::ConnContext;
use crate::doc::inspect::{Inspection, OwnerFacts};
use crate::doc::json::{Kind, Roots, TextAs};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chorus_protocol::DocId;
use std::collections::HashMap;
use std::sync::Arc;

/// Longest a request waits for a decode permit before it is answered 503.
const DECODE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most root types a `types` parameter may name.
const MAX_HINTS: usize = 256;

/// `GET /v1/docs/{doc}/json[?text=delta][&types=name:kind,…]`: every root type as JSON (read
/// grant). `types` names kinds the content cannot settle (see `doc::json`).
pub(super) async fn get_json(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
    let text = match query.get("text").map(String::as_str) {
        None | Some("string") => TextAs::String,
        Some("delta") => TextAs::Delta,
        Some(other) => {
            return Err(ApiError::BadQuery(format!(
                "text must be string or delta, not {other:?}"
            )));
        }
    };
    let hints = hints(&query)?;
    let (state, position) = ctx
        .registry
        .with_owner(&doc, |h| async move { h.state().await })
        .await?;
    let json = decode_off_owner(&ctx, move || {
        Roots::decode(&state, &hints).map(|roots| roots.to_json(text))
    })
    .await?;
    Ok(([super::position_header(position)], axum::Json(json)).into_response())
}

/// `GET /v1/docs/{doc}/inspect[?types=…]`: the inspector (admin key, or a read grant).
pub(super) async fn inspect(
    State(ctx): State<Arc<ConnContext>>,
    Path(doc): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let doc = DocId::parse(&doc)?;
    if admin(&ctx, &headers) != Some(true) {
        authorize(&ctx, &headers, &query, Some((&doc, Access::Read)))?;
    }
    let hints = hints(&query)?;
    let hot = ctx.registry.is_hot(&doc);
    let facts: OwnerFacts = ctx
        .registry
        .with_owner(&doc, |h| async move { h.inspect().await })
        .await?;
    let name = doc.to_string();
    let inspection =
        decode_off_owner(&ctx, move || Inspection::build(name, hot, facts, &hints)).await?;
    Ok(axum::Json(inspection).into_response())
}

/// `types=name:kind,…` (kinds: text, map, array, xml).
fn hints(query: &HashMap<String, String>) -> Result<HashMap<String, Kind>, ApiError> {
    let Some(list) = query.get("types") else {
        return Ok(HashMap::new());
    };
    let mut hints = HashMap::new();
    for pair in list.split(',').filter(|p| !p.is_empty()) {
        let (name, kind) = pair
            .rsplit_once(':')
            .ok_or_else(|| ApiError::BadQuery(format!("types: {pair:?} is not name:kind")))?;
        let kind = Kind::parse(kind).ok_or_else(|| {
            ApiError::BadQuery(format!(
                "types: {kind:?} is not one of text, map, array, xml"
            ))
        })?;
        if hints.len() >= MAX_HINTS {
            return Err(ApiError::BadQuery(format!(
                "types names more than {MAX_HINTS} roots"
            )));
        }
        hints.insert(name.to_owned(), kind);
    }
    Ok(hints)
}

/// Runs a whole-document decode on a tracked blocking thread under a decode permit.
async fn decode_off_owner<T: Send + 'static>(
    ctx: &ConnContext,
    decode: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = tokio::time::timeout(DECODE_WAIT, ctx.decodes.clone().acquire_owned())
        .await
        .map_err(|_| ApiError::Busy)?
        .map_err(|_| ApiError::Unavailable)?;
    let decoded = ctx
        .tracker
        .spawn_blocking(move || {
            let _permit = permit;
            decode()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("decoding failed: {e}")))?;
    decoded.map_err(ApiError::Internal)
}
