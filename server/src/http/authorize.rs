//! The first step of every document request and upgrade: the origin check and the token's verdict.

use super::ApiError;
use crate::auth::{Access, AuthError, Principal};
use crate::connection::ConnContext;
use axum::http::{HeaderMap, header};
use chorus_protocol::DocId;
use std::collections::HashMap;

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
pub(super) fn authorize(
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

/// Whether the request carries the node's admin key (`Authorization: Bearer <--admin-key>`).
/// `None` when the node has no admin key.
pub(super) fn admin(ctx: &ConnContext, headers: &HeaderMap) -> Option<bool> {
    let key = ctx.config.admin_key.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    Some(given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())))
}

/// Compares secrets without an early exit that would leak how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
