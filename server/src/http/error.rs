//! Where a failed HTTP request ends: errors and refusals become statuses with JSON bodies.

use crate::auth::AuthError;
use crate::connection::Refused;
use crate::connection::sse;
use crate::doc::DocError;
use crate::doc::admit::Refusal;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chorus_protocol::{DocIdError, PositionParseError};
use serde_json::json;

/// Errors of the HTTP API, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    BadDocId(#[from] DocIdError),
    /// The write door refused the update; its table says how (see [`Refusal::http`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the document is unavailable; retry")]
    Unavailable,
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("admin key missing or wrong")]
    Admin,
    #[error("bad position in {0}: {1}")]
    BadPosition(&'static str, PositionParseError),
    #[error("wait must be a number of seconds from 0 to {}", sse::MAX_WAIT.as_secs())]
    BadWait,
    #[error("{}", DocError::Full)]
    NodeFull,
    #[error("bad query parameter: {0}")]
    BadQuery(String),
    /// Whole-document decodes are all taken (see `ConnContext::decodes`).
    #[error("the node is busy decoding other documents; retry")]
    Busy,
    #[error("the document could not be read: {0}")]
    Internal(String),
    #[error("more than --max-api-requests-per-second requests from this address; retry in {}s", .0.as_secs().max(1))]
    RateLimited(std::time::Duration),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadDocId(_) => (StatusCode::BAD_REQUEST, "bad_doc_id"),
            ApiError::Refused(r) => r.http(),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Auth(e) => e.http(),
            ApiError::Admin => (StatusCode::UNAUTHORIZED, "bad_admin_key"),
            ApiError::BadPosition(..) => (StatusCode::BAD_REQUEST, "bad_position"),
            ApiError::BadWait => (StatusCode::BAD_REQUEST, "bad_wait"),
            ApiError::NodeFull => (StatusCode::SERVICE_UNAVAILABLE, "node_full"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query"),
            ApiError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
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

pub(super) fn refused(r: Refused) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::BackplaneError;

    /// A write refused at the door answers with the status its table gives, and a refusal on
    /// our side tells the client when to retry.
    #[test]
    fn refusals_answer_with_the_tables_status() {
        let missing = ApiError::from(Refusal::MissingDependencies).into_response();
        assert_eq!(missing.status(), StatusCode::CONFLICT);
        assert!(missing.headers().get(header::RETRY_AFTER).is_none());
        let failed = ApiError::from(Refusal::AppendFailed(BackplaneError::Storage(
            "disk".into(),
        )))
        .into_response();
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            failed.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from_static("1"))
        );
        let revoked = ApiError::from(Refusal::Token(AuthError::Revoked)).into_response();
        assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
    }
}
