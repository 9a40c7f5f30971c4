//! The native protocol session (`/v1/ws`): MessagePack frames, many documents per socket.

use super::{ConnContext, Session, Step};
use crate::auth::{Access, Principal};
use crate::backplane::{BackplaneError, Origin};
use crate::doc::outbox::Outbox;
use crate::doc::{DocError, DocHandle, Readiness, Registry, SyncFrom};
use crate::validate::{self, Rejected};
use bytes::Bytes;
use chorus_protocol::{
    ClientFrame, CloseCode, DecodeError, DocId, ErrorCode, Position, ServerFrame,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// An append in flight: which document and client `seq` it answers, and how it ended.
pub struct AppendDone {
    pub doc: DocId,
    pub seq: Option<u64>,
    /// The append chain it belonged to (see `backplane::Chains`).
    pub chain: u64,
    pub result: Result<Position, BackplaneError>,
}

pub type AppendFuture = BoxFuture<'static, AppendDone>;

/// Starts an append for a validated update and wraps its outcome with what answers it.
pub fn start_append(
    registry: &Registry,
    doc: &DocId,
    update: Bytes,
    reach: Option<validate::Reach>,
    origin: Origin,
) -> AppendFuture {
    let fut = registry
        .backplane()
        .append(doc, update, reach, Some(origin));
    let (doc, seq, chain) = (doc.clone(), origin.seq, origin.chain);
    let started = std::time::Instant::now();
    fut.map(move |result| {
        let hot = crate::metrics::hot();
        hot.append_seconds.record(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => &hot.updates_in,
            Err(_) => &hot.append_errors,
        }
        .increment(1);
        AppendDone {
            doc,
            seq,
            chain,
            result,
        }
    })
    .boxed()
}

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
    /// Per document, the clocks this socket's admitted appends reach, per yrs client: a
    /// client's next update may build on its previous one before the document applied it.
    own: HashMap<DocId, HashMap<u64, u64>>,
    /// Per document, the yrs clients whose appends from this socket failed: their next updates
    /// build on something that will never arrive unless the client resends it.
    lost: HashMap<DocId, std::collections::HashSet<u64>>,
    /// Per document, this socket's append chain: a new one starts when an append failed, so
    /// the log refuses the appends made before we heard (they may build on the failed one)
    /// and takes those made after (see `backplane::Chains`). An entry exists only for a
    /// document one of whose appends failed.
    chains: HashMap<DocId, u64>,
    /// New subscriptions (`--max-subscribes-per-second`): unsubscribing frees a place under
    /// `--max-docs-per-connection`, and without this a loop of both would load a document
    /// each turn.
    subscribes: crate::limits::TokenBucket,
}

impl NativeSession {
    pub fn new(ctx: Arc<ConnContext>, outbox: Arc<Outbox>, principal: Principal) -> Self {
        ctx.set_holder(&outbox, principal.clone());
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
            own: HashMap::new(),
            lost: HashMap::new(),
            chains: HashMap::new(),
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
        let clients_fault = !matches!(code, ErrorCode::AppendFailed | ErrorCode::Unavailable);
        self.send_error(code, message, doc, seq, clients_fault)
    }

    fn send_error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        doc: Option<&str>,
        seq: Option<u64>,
        clients_fault: bool,
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
        if !queued || (clients_fault && !self.errors.spend()) {
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
        self.ctx.set_holder(&self.outbox, principal.clone());
        self.principal = principal;
        let denied: Vec<DocId> = self
            .docs
            .keys()
            .filter(|d| self.principal.access(d).is_none())
            .cloned()
            .collect();
        for id in denied {
            if let Some(handle) = self.docs.remove(&id) {
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
        if self.principal.access(&id) != Some(Access::Write) {
            self.ctx.refused_writes.fetch_add(1, Ordering::Relaxed);
            return self.error(
                ErrorCode::ReadOnly,
                "the token grants only read access to this document",
                Some(&doc),
                seq,
            );
        }
        if handle.approx_size() + update.len() > self.config.max_document_bytes {
            let limit = self.config.max_document_bytes;
            return self.error(
                ErrorCode::DocumentTooLarge,
                format!("the document reached the {limit}-byte limit and takes no more updates"),
                Some(&doc),
                seq,
            );
        }
        let update = Bytes::from(update);
        let (deps, reach) = match validate::check_update(&update, self.config.max_update_bytes) {
            Ok(checked) => (checked.deps, checked.reach),
            Err(e) => {
                let code = match e {
                    Rejected::TooLarge(..) | Rejected::TooManyClients(..) => ErrorCode::TooLarge,
                    _ => ErrorCode::BadUpdate,
                };
                return self.error(code, e.to_string(), Some(&doc), seq);
            }
        };
        // Reading this socket pauses while an update waits for its dependencies: appends must
        // be admitted in the order the client sent them.
        let mut own = self.own.remove(&id).unwrap_or_default();
        handle.forget_known(&mut own);
        let readiness = handle
            .wait_ready(
                &deps,
                Some(&own),
                self.lost.get(&id),
                self.config.missing_deps_wait,
            )
            .await;
        if readiness != Readiness::Met {
            self.ctx
                .refused_missing_deps
                .fetch_add(1, Ordering::Relaxed);
            self.own.insert(id, own);
            if readiness == Readiness::Lost {
                // Our append failed, not the client: no charge against its error budget.
                return self.send_error(
                    ErrorCode::MissingDependencies,
                    "the update builds on one of yours that could not be appended; send your state again",
                    Some(&doc),
                    seq,
                    false,
                );
            }
            return self.error(
                ErrorCode::MissingDependencies,
                "the update builds on changes this document does not have",
                Some(&doc),
                seq,
            );
        }
        // Checked after the wait: the token may have been revoked (or expired) meanwhile.
        if let Err(e) = self.ctx.admit_write(&self.principal) {
            self.own.insert(id, own);
            let _ = self.error(ErrorCode::Forbidden, e.to_string(), Some(&doc), seq);
            return Step::Close(e.close_code());
        }
        for (client, end) in deps.ends() {
            let reach = own.entry(client).or_default();
            *reach = (*reach).max(end);
            if let Some(lost) = self.lost.get_mut(&id) {
                lost.remove(&client);
            }
        }
        self.own.insert(id.clone(), own);
        let origin = Origin {
            node: self.registry.node(),
            conn: self.outbox.conn,
            seq,
            chain: self.chains.get(&id).copied().unwrap_or(0),
        };
        self.inflight.push(start_append(
            &self.registry,
            &id,
            update,
            Some(reach),
            origin,
        ));
        Step::Continue
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
                    self.own.remove(&id);
                    self.lost.remove(&id);
                    // `chains` stays: the log may still remember this socket's failed chain for
                    // the document, and a re-subscription must not start that chain over.
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
                let chain = self.chains.entry(done.doc.clone()).or_default();
                if *chain == done.chain {
                    *chain += 1;
                }
                // What this socket's later updates may build on did not make it into the log.
                if let Some(own) = self.own.remove(&done.doc) {
                    self.lost
                        .entry(done.doc.clone())
                        .or_default()
                        .extend(own.into_keys());
                }
                self.error(
                    ErrorCode::AppendFailed,
                    e.to_string(),
                    Some(done.doc.as_str()),
                    done.seq,
                )
            }
        }
    }

    fn documents(&mut self) -> Vec<DocHandle> {
        self.docs.drain().map(|(_, h)| h).collect()
    }

    fn expires_at(&self) -> Option<u64> {
        self.principal.exp
    }

    fn warn_expiring(&mut self) {
        if let Some(expires_at) = self.principal.exp {
            let frame = ServerFrame::AuthExpiring { expires_at };
            if let Ok(bytes) = frame.encode() {
                self.outbox.push_control(Bytes::from(bytes));
            }
        }
    }
}
