//! Wire format shared by the server and every client: native frames, positions, codes. No I/O.
//!
//! The native protocol (`GET /v1/ws`) carries one MessagePack value per binary WebSocket
//! message. Every frame is a map with a `type` field naming the frame and the frame's fields
//! beside it (field names, not positions, so third-party clients can use any MessagePack
//! library). Byte fields are MessagePack `bin`. The README holds the same table for client
//! authors; this module is the source of truth.

mod codes;
mod docid;
mod position;
pub mod y_websocket;

pub use codes::{CloseCode, ErrorCode};
pub use docid::{DocId, DocIdError, MAX_DOC_ID_LEN};
pub use position::{Position, PositionParseError, StreamId};

use serde::{Deserialize, Serialize};

/// A frame sent by a client on `/v1/ws`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Start receiving a document. With `position`, the server replays what came after it;
    /// with `state_vector` (yrs v1 encoding) it sends the diff against that state. With
    /// neither, the whole document.
    Subscribe {
        doc: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<Position>,
        #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
        state_vector: Option<Vec<u8>>,
    },
    /// A yrs v1 update to append to the document. `seq` is the client's own number for it,
    /// echoed in the `ack` (or `error`) that answers it.
    Update {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// A y-protocols awareness update (presence, cursors) for the document.
    Awareness {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// Stop receiving a document; the server removes the awareness states this socket set on it.
    Unsubscribe { doc: String },
    /// A fresh token for this socket (before the current one expires). Its grants replace the
    /// old ones; documents it no longer grants are unsubscribed with a `forbidden` error.
    Auth { token: String },
}

/// A frame sent by the server on `/v1/ws`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Answer to `subscribe`: `update` brings the client up to `position`. `replay` is true
    /// when `update` is exactly the log entries after the client's position (merged), false
    /// when it is a state-vector diff or the whole document.
    Synced {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
        position: Position,
        replay: bool,
    },
    /// A log entry (or several merged, for a client that fell behind) up to `position`.
    Update {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
        position: Position,
    },
    /// Awareness changes from other clients of the document (y-protocols encoding).
    Awareness {
        doc: String,
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// The client's update `seq` is durably appended at `position`. Acks and updates of one
    /// document arrive in log order, so `position` is also a valid resume point.
    Ack {
        doc: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        position: Position,
    },
    /// The socket's token expires at `expires_at` (Unix seconds): send `auth` with a fresh
    /// one before then, or the socket is closed with 4101.
    AuthExpiring { expires_at: u64 },
    /// A request failed. `doc` and `seq` say which one, when it concerned one.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        doc: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not a MessagePack map of a known shape: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
}

impl DecodeError {
    /// Tells an unknown `type` apart from a malformed frame, so the error code can say which.
    fn classify(bytes: &[u8], err: rmp_serde::decode::Error, known: &[&str]) -> Self {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "type")]
            kind: String,
        }
        match rmp_serde::from_slice::<Probe>(bytes) {
            Ok(p) if !known.contains(&p.kind.as_str()) => DecodeError::UnknownType(p.kind),
            _ => DecodeError::Malformed(err),
        }
    }
}

/// Why a frame could not be encoded (only for values serde cannot represent).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode frame: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

impl ClientFrame {
    pub const TYPES: &'static [&'static str] =
        &["subscribe", "update", "awareness", "unsubscribe", "auth"];

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::classify(bytes, e, Self::TYPES))
    }

    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }
}

impl ServerFrame {
    pub const TYPES: &'static [&'static str] = &[
        "synced",
        "update",
        "awareness",
        "ack",
        "auth_expiring",
        "error",
    ];

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::classify(bytes, e, Self::TYPES))
    }

    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }
}

/// Borrowed encoders for the server's hot path: they write the same bytes as
/// [`ServerFrame::encode`] without first copying the update into an owned frame.
pub mod encode {
    use super::Position;
    use serde::Serialize;

    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Borrowed<'a> {
        Update {
            doc: &'a str,
            #[serde(with = "serde_bytes")]
            update: &'a [u8],
            position: Position,
        },
        Awareness {
            doc: &'a str,
            #[serde(with = "serde_bytes")]
            update: &'a [u8],
        },
        Synced {
            doc: &'a str,
            #[serde(with = "serde_bytes")]
            update: &'a [u8],
            position: Position,
            replay: bool,
        },
    }

    fn to_vec(frame: &Borrowed<'_>) -> Vec<u8> {
        // Serializing these plain structs into a Vec cannot fail: every field is a string,
        // bytes, bool or integer, all representable in MessagePack.
        rmp_serde::to_vec_named(frame).unwrap_or_default()
    }

    pub fn update(doc: &str, update: &[u8], position: Position) -> Vec<u8> {
        to_vec(&Borrowed::Update {
            doc,
            update,
            position,
        })
    }

    pub fn awareness(doc: &str, update: &[u8]) -> Vec<u8> {
        to_vec(&Borrowed::Awareness { doc, update })
    }

    pub fn synced(doc: &str, update: &[u8], position: Position, replay: bool) -> Vec<u8> {
        to_vec(&Borrowed::Synced {
            doc,
            update,
            position,
            replay,
        })
    }
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => serde_bytes::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(|b| b.into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos() -> Position {
        Position::new(42, StreamId::new(1_700_000_000_000, 3))
    }

    #[test]
    fn client_frames_round_trip() {
        let frames = [
            ClientFrame::Subscribe {
                doc: "a".into(),
                position: Some(pos()),
                state_vector: Some(vec![0]),
            },
            ClientFrame::Subscribe {
                doc: "a".into(),
                position: None,
                state_vector: None,
            },
            ClientFrame::Update {
                doc: "a".into(),
                update: vec![1, 2, 3],
                seq: Some(7),
            },
            ClientFrame::Awareness {
                doc: "a".into(),
                update: vec![0],
            },
            ClientFrame::Unsubscribe { doc: "a".into() },
        ];
        for f in frames {
            let bytes = f.encode().expect("encode");
            assert_eq!(ClientFrame::decode(&bytes).expect("decode"), f);
        }
    }

    #[test]
    fn server_frames_round_trip_and_borrowed_encoders_match() {
        let f = ServerFrame::Update {
            doc: "d".into(),
            update: vec![9, 9],
            position: pos(),
        };
        assert_eq!(
            encode::update("d", &[9, 9], pos()),
            f.encode().expect("encode")
        );
        let f2 = ServerFrame::Synced {
            doc: "d".into(),
            update: vec![1],
            position: pos(),
            replay: true,
        };
        assert_eq!(
            encode::synced("d", &[1], pos(), true),
            f2.encode().expect("encode")
        );
        let f3 = ServerFrame::Awareness {
            doc: "d".into(),
            update: vec![1],
        };
        assert_eq!(encode::awareness("d", &[1]), f3.encode().expect("encode"));
        for f in [
            f,
            f2,
            f3,
            ServerFrame::Ack {
                doc: "d".into(),
                seq: Some(1),
                position: pos(),
            },
            ServerFrame::Error {
                code: ErrorCode::BadUpdate,
                message: "x".into(),
                doc: None,
                seq: None,
            },
        ] {
            let bytes = f.encode().expect("encode");
            assert_eq!(ServerFrame::decode(&bytes).expect("decode"), f);
        }
    }

    #[test]
    fn garbage_and_unknown_types_are_errors_not_panics() {
        assert!(ClientFrame::decode(&[]).is_err());
        assert!(ClientFrame::decode(&[0xc1]).is_err());
        let unknown = rmp_serde::to_vec_named(&serde_json::json!({"type": "nope", "doc": "a"}));
        assert!(matches!(
            ClientFrame::decode(&unknown.expect("encode")),
            Err(DecodeError::UnknownType(t)) if t == "nope"
        ));
        let missing = rmp_serde::to_vec_named(&serde_json::json!({"type": "update", "doc": "a"}));
        assert!(matches!(
            ClientFrame::decode(&missing.expect("encode")),
            Err(DecodeError::Malformed(_))
        ));
    }
}
