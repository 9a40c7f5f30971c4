//! The native protocol session (`/v1/ws`): MessagePack frames, many documents per socket.

use super::{ConnContext, Session, Step};
use crate::auth::Principal;
use crate::doc::admit::{Fault, Refusal, Writer};
use crate::doc::outbox::Outbox;
use crate::doc::{DocError, DocHandle, Registry, SyncFrom};
use crate::validate;
use bytes::Bytes;
use chorus_protocol::{
    ClientFrame, CloseCode, DecodeError, DocId, ErrorCode, Position, ServerFrame,
};
use futures_util::stream::FuturesUnordered;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

// The session loop (`super::run`) polls appends by these names.
pub use crate::doc::admit::{AppendDone, AppendFuture};

/// Bad frames allowed in a burst, and refilled per second, before a connection is closed with
/// 1008: a buggy client gets clear errors, a hostile one cannot make us spin on them.
pub struct ErrorBudget {
    tokens: f64,
    last: Instant,
}

impl ErrorBudget {
    const BURST: f64 = 20.0;
    const PER_SEC: f64 = 2.0;

    pub fn new() -> Self {
        ErrorBudget {
            tokens: Self::BURST,
            last: Instant::now(),
        }
    }

    /// Spends one token; false when the budget is exhausted.
    pub fn spend(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * Self::PER_SEC;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.last = now;
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }
}

impl Default for ErrorBudget {
    fn default() -> Self {
        Self::new()
    }
}

pub struct NativeSession {
    ctx: Arc<ConnContext>,
    /// Who holds this socket and what they may touch; replaced by `auth` refreshes.
    principal: Principal,
    registry: Arc<Registry>,
    config: Arc<crate::Config>,
    outbox: Arc<Outbox>,
    docs: HashMap<DocId, DocHandle>,
    inflight: FuturesUnordered<AppendFuture>,
    errors: ErrorBudget,
    /// Per document, what the write door remembers of this socket as a writer (its clocks and
    /// append chain). An entry exists while the document is subscribed, and after that only
    /// if one of its appends failed (see `Writer::unsubscribed`).
    writers: HashMap<DocId, Writer>,
    /// New subscriptions (`--max-subscribes-per-second`): unsubscribing frees a place under
    /// `--max-docs-per-connection`, and without this a loop of both would load a document
    /// each turn.
    subscribes: crate::limits::TokenBucket,
}

impl NativeSession {
    pub fn new(ctx: Arc<ConnContext>, outbox: Arc<Outbox>, principal: Principal) -> Self {
        ctx.set_holder(&outbox, principal.clone(), Some(expiring_frame));
        let subscribes = crate::limits::TokenBucket::new(
            ctx.config.max_subscribes_per_second,
            u32::try_from(ctx.config.max_docs_per_connection).unwrap_or(u32::MAX),
        );
        NativeSession {
            registry: ctx.registry.clone(),
            config: ctx.config.clone(),
            ctx,
            principal,
            outbox,
            docs: HashMap::new(),
            inflight: FuturesUnordered::new(),
            errors: ErrorBudget::new(),
            writers: HashMap::new(),
            subscribes,
        }
    }

    fn error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        doc: Option<&str>,
        seq: Option<u64>,
    ) -> Step {
        // Failures on our side do not count against the client; everything else does.
        let fault = match code {
            ErrorCode::AppendFailed | ErrorCode::Unavailable => Fault::Server,
            _ => Fault::Client,
        };
        self.send_error(code, message, doc, seq, fault)
    }

    /// Answers a refusal of the write door, as its table says (see [`Refusal`]).
    fn refuse(&mut self, refusal: &Refusal, doc: &str, seq: Option<u64>) -> Step {
        let step = self.send_error(
            refusal.error_code(),
            refusal.to_string(),
            Some(doc),
            seq,
            refusal.fault(),
        );
        match refusal.native_close() {
            Some(code) => Step::Close(code),
            None => step,
        }
    }

    fn send_error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        doc: Option<&str>,
        seq: Option<u64>,
        fault: Fault,
    ) -> Step {
        let frame = ServerFrame::Error {
            code,
            message: message.into(),
            doc: doc.map(str::to_owned),
            seq,
        };
        let queued = frame
            .encode()
            .map(|b| self.outbox.push_control(Bytes::from(b)))
            .unwrap_or(false);
        if !queued || (fault == Fault::Client && !self.errors.spend()) {
            return Step::Close(CloseCode::PolicyViolation);
        }
        Step::Continue
    }

    fn doc_id(&mut self, doc: &str) -> Result<DocId, Step> {
        DocId::parse(doc)
            .map_err(|e| self.error(ErrorCode::BadDocId, e.to_string(), Some(doc), None))
    }

    async fn subscribe(
        &mut self,
        doc: String,
        position: Option<Position>,
        state_vector: Option<Vec<u8>>,
    ) -> Step {
        let id = match self.doc_id(&doc) {
            Ok(id) => id,
            Err(step) => return step,
        };
        if self.principal.access(&id).is_none() {
            return self.error(
                ErrorCode::Forbidden,
                "the token does not grant access to this document",
                Some(&doc),
                None,
            );
        }
        if !self.docs.contains_key(&id) && self.docs.len() >= self.config.max_docs_per_connection {
            let limit = self.config.max_docs_per_connection;
            return self.error(
                ErrorCode::TooManyDocs,
                format!("this socket already holds {limit} documents"),
                Some(&doc),
                None,
            );
        }
        if !self.docs.contains_key(&id) && !self.subscribes.try_take() {
            let rate = self.config.max_subscribes_per_second;
            return self.error(
                ErrorCode::RateLimited,
                format!("subscribing to more than {rate} new documents per second"),
                Some(&doc),
                None,
            );
        }
        let state_vector = match state_vector
            .map(|sv| validate::decode_state_vector(&sv))
            .transpose()
        {
            Ok(sv) => sv,
            Err(e) => {
                return self.error(ErrorCode::BadStateVector, e.to_string(), Some(&doc), None);
            }
        };
        let from = SyncFrom {
            position,
            state_vector,
        };
        match self
            .registry
            .subscribe(&id, self.outbox.conn, &self.outbox, &from)
            .await
        {
            Ok(handle) => {
                self.docs.insert(id, handle);
                Step::Continue
            }
            Err(e @ (DocError::Gone | DocError::Unavailable | DocError::Full)) => {
                self.error(ErrorCode::Unavailable, e.to_string(), Some(&doc), None)
            }
        }
    }

    /// A fresh token over the open socket: its grants replace the old ones, and documents it
    /// no longer grants are unsubscribed (with `forbidden`), the others keep working.
    async fn refresh(&mut self, token: &str) -> Step {
        let principal = match self.ctx.auth.verify(Some(token)) {
            Ok(p) => p,
            Err(e) => return self.error(ErrorCode::BadToken, e.to_string(), None, None),
        };
        // Re-files the expiry (and its warning) for the new token.
        self.ctx
            .set_holder(&self.outbox, principal.clone(), Some(expiring_frame));
        self.principal = principal;
        let denied: Vec<DocId> = self
            .docs
            .keys()
            .filter(|d| self.principal.access(d).is_none())
            .cloned()
            .collect();
        for id in denied {
            if let Some(handle) = self.docs.remove(&id) {
                self.unsubscribed(&id);
                handle.unsubscribe(self.outbox.conn).await;
            }
            if let Step::Close(code) = self.error(
                ErrorCode::Forbidden,
                "the new token does not grant this document; unsubscribed",
                Some(id.as_str()),
                None,
            ) {
                return Step::Close(code);
            }
        }
        Step::Continue
    }

    /// Forgets the socket's clocks for a document it left (see `Writer::unsubscribed`).
    fn unsubscribed(&mut self, id: &DocId) {
        if let Some(writer) = self.writers.get_mut(id)
            && !writer.unsubscribed()
        {
            self.writers.remove(id);
        }
    }

    async fn update(&mut self, doc: String, update: Vec<u8>, seq: Option<u64>) -> Step {
        let id = match self.doc_id(&doc) {
            Ok(id) => id,
            Err(step) => return step,
        };
        let Some(handle) = self.docs.get(&id).cloned() else {
            return self.error(
                ErrorCode::NotSubscribed,
                "subscribe before sending updates",
                Some(&doc),
                seq,
            );
        };
        // Reading this socket pauses while the door waits for the update's dependencies:
        // appends must be admitted in the order the client sent them.
        let ctx = self.ctx.clone();
        let conn = self.outbox.conn;
        let mut writer = self
            .writers
            .remove(&id)
            .unwrap_or_else(|| Writer::socket(conn));
        let admitted = ctx
            .door
            .admit(
                &self.principal,
                &handle,
                &mut writer,
                Bytes::from(update),
                seq,
            )
            .await;
        self.writers.insert(id, writer);
        match admitted {
            Ok(append) => {
                self.inflight.push(append);
                Step::Continue
            }
            Err(refusal) => self.refuse(&refusal, &doc, seq),
        }
    }

    async fn awareness(&mut self, doc: String, update: Vec<u8>) -> Step {
        let id = match self.doc_id(&doc) {
            Ok(id) => id,
            Err(step) => return step,
        };
        let Some(handle) = self.docs.get(&id).cloned() else {
            return self.error(
                ErrorCode::NotSubscribed,
                "subscribe before sending awareness",
                Some(&doc),
                None,
            );
        };
        match validate::decode_awareness(&update, self.config.max_update_bytes) {
            Ok(update) => {
                if handle.awareness(self.outbox.conn, update).await.is_err() {
                    self.docs.remove(&id);
                    return self.error(
                        ErrorCode::Unavailable,
                        "document was unloaded; subscribe again",
                        Some(&doc),
                        None,
                    );
                }
                Step::Continue
            }
            Err(e) => self.error(ErrorCode::BadAwareness, e.to_string(), Some(&doc), None),
        }
    }
}

impl Session for NativeSession {
    async fn on_binary(&mut self, bytes: Bytes) -> Step {
        match ClientFrame::decode(&bytes) {
            Ok(ClientFrame::Subscribe {
                doc,
                position,
                state_vector,
            }) => self.subscribe(doc, position, state_vector).await,
            Ok(ClientFrame::Update { doc, update, seq }) => self.update(doc, update, seq).await,
            Ok(ClientFrame::Awareness { doc, update }) => self.awareness(doc, update).await,
            Ok(ClientFrame::Auth { token }) => self.refresh(&token).await,
            Ok(ClientFrame::Unsubscribe { doc }) => {
                if let Ok(id) = DocId::parse(&doc)
                    && let Some(handle) = self.docs.remove(&id)
                {
                    self.unsubscribed(&id);
                    handle.unsubscribe(self.outbox.conn).await;
                }
                Step::Continue
            }
            Err(DecodeError::UnknownType(t)) => self.error(
                ErrorCode::UnknownFrame,
                format!("unknown frame type {t:?}"),
                None,
                None,
            ),
            Err(e) => self.error(ErrorCode::BadFrame, e.to_string(), None, None),
        }
    }

    fn on_rate_limited(&mut self) -> Option<Step> {
        let limit = self.config.max_messages_per_second;
        Some(self.error(
            ErrorCode::RateLimited,
            format!("more than {limit} messages per second; this one was not processed"),
            None,
            None,
        ))
    }

    fn inflight(&mut self) -> &mut FuturesUnordered<AppendFuture> {
        &mut self.inflight
    }

    fn on_appended(&mut self, done: AppendDone) -> Step {
        match done.result {
            // The ack itself comes from the document, in log order with the updates.
            Ok(_) => Step::Continue,
            Err(e) => {
                tracing::warn!(doc = %done.doc, error = %e, "append failed");
                let conn = self.outbox.conn;
                self.writers
                    .entry(done.doc.clone())
                    .or_insert_with(|| Writer::socket(conn))
                    .append_failed(done.chain);
                self.refuse(&Refusal::AppendFailed(e), done.doc.as_str(), done.seq)
            }
        }
    }

    fn documents(&mut self) -> Vec<DocHandle> {
        self.docs.drain().map(|(_, h)| h).collect()
    }
}

/// The native warning that the socket's token expires soon (sent by the node's sweep, see
/// [`super::sweep`]): the client answers with an `auth` frame carrying a fresh token.
fn expiring_frame(expires_at: u64) -> Option<Bytes> {
    ServerFrame::AuthExpiring { expires_at }
        .encode()
        .ok()
        .map(Bytes::from)
}
