//! Chorus client: the sans-IO sync core (session → documents, presence, backoff) and, on wasm32, its browser API.
//!
//! Data flow: the driver's socket delivers server frames to [`Session::received`]; the session
//! applies them to each [`DocState`]'s yrs replica and queues [`Event`]s; local edits go the
//! other way, queued as pending (unacknowledged) updates and written out through
//! [`Session::poll_transmit`]. The core never touches a socket, a timer or a clock.

pub mod backoff;
pub mod document;
pub mod presence;
pub mod session;
#[cfg(target_arch = "wasm32")]
mod wasm;

pub use backoff::Backoff;
pub use document::{DocState, TEXT_NAME, TextOp};
pub use presence::{Presence, PresenceChange};
pub use session::{CloseDecision, Event, Session, SessionConfig, SessionError, Status};
