//! Stable error codes (in `error` frames) and WebSocket close codes, with what each means.

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame. Stable: clients may branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not a MessagePack map of a known shape.
    BadFrame,
    /// The frame's `type` is not one this server knows.
    UnknownFrame,
    /// The document id is not valid (see the README for the alphabet).
    BadDocId,
    /// The update failed validation (undecodable, too deeply nested, or one the document could
    /// not take). It was not appended.
    BadUpdate,
    /// The awareness update could not be decoded or carried invalid JSON.
    BadAwareness,
    /// The state vector sent with `subscribe` could not be decoded.
    BadStateVector,
    /// An update or awareness frame named a document this socket has not subscribed to.
    NotSubscribed,
    /// The update is larger than the server's limit.
    TooLarge,
    /// This socket already holds the maximum number of documents.
    TooManyDocs,
    /// The update could not be appended to the log; nothing was acknowledged. Retry later.
    AppendFailed,
    /// The connection sent more messages per second than allowed; this one was not processed.
    RateLimited,
    /// The document reached the size limit and takes no more updates.
    DocumentTooLarge,
    /// The token does not grant access to this document.
    Forbidden,
    /// The token grants only read access to this document; the update was not applied.
    ReadOnly,
    /// The token sent with `auth` is invalid, expired or revoked; the socket keeps its old one.
    BadToken,
    /// The document could not be loaded. Retry later.
    Unavailable,
    /// The update builds on changes the document does not have (and did not receive within
    /// the wait bound); yrs would park it forever. It was not appended.
    MissingDependencies,
    /// The awareness update set or removed a client id another connection introduced. Nothing
    /// in it was applied.
    AwarenessNotOwned,
}

impl ErrorCode {
    /// Whether sending the same request again later may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::AppendFailed | ErrorCode::Unavailable | ErrorCode::RateLimited
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownFrame => "unknown_frame",
            ErrorCode::BadDocId => "bad_doc_id",
            ErrorCode::BadUpdate => "bad_update",
            ErrorCode::BadAwareness => "bad_awareness",
            ErrorCode::BadStateVector => "bad_state_vector",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooManyDocs => "too_many_docs",
            ErrorCode::AppendFailed => "append_failed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::DocumentTooLarge => "document_too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ReadOnly => "read_only",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::MissingDependencies => "missing_dependencies",
            ErrorCode::AwarenessNotOwned => "awareness_not_owned",
        }
    }
}

/// WebSocket close codes the server sends. 1000–1015 are RFC 6455's; 4000–4099 mean "reconnect
/// and resume from your last position"; 4100–4199 mean "do not reconnect without changing
/// something" (credentials, client code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The client asked to close.
    Normal = 1000,
    /// The server is shutting down or draining: reconnect (to any node) and resume.
    GoingAway = 1001,
    /// A text frame on a binary protocol.
    UnsupportedData = 1003,
    /// Too many invalid frames in a row; the connection is not behaving as a client should.
    PolicyViolation = 1008,
    /// A message larger than the server's maximum message size.
    MessageTooBig = 1009,
    /// An unexpected server fault on this connection; reconnect and resume.
    InternalError = 1011,
    /// No pong (or any frame) within the heartbeat timeout. Seldom seen by the client itself,
    /// since a silent peer is usually gone; reconnect and resume.
    HeartbeatTimeout = 4000,
    /// The client read too slowly and its pending data passed the hard limit: reconnect and
    /// resume from the last position it received.
    TooSlow = 4001,
    /// The socket's token expired without a refresh: reconnect with a fresh token.
    TokenExpired = 4101,
    /// The socket's token (or its subject) was revoked.
    Revoked = 4103,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "bye",
            CloseCode::GoingAway => "server going away, reconnect and resume",
            CloseCode::UnsupportedData => "binary frames only",
            CloseCode::PolicyViolation => "too many invalid frames",
            CloseCode::MessageTooBig => "message too big",
            CloseCode::InternalError => "internal error, reconnect and resume",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::TooSlow => "too slow, reconnect and resume",
            CloseCode::TokenExpired => "token expired",
            CloseCode::Revoked => "token revoked",
        }
    }

    /// Whether a client should reconnect (with backoff) after this close.
    pub fn reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::Normal
                | CloseCode::TokenExpired
                | CloseCode::Revoked
                | CloseCode::UnsupportedData
                | CloseCode::PolicyViolation
                | CloseCode::MessageTooBig
        )
    }
}
