//! The y-websocket session (`/y/{doc}`): stock Yjs clients, one document per socket, one
//! y-protocols message per WebSocket frame (stable y-websocket clients read only the first
//! message of a frame).
//!
//! Client messages are parsed by hand here (a type byte and a length-prefixed payload, the same
//! bytes `yrs::sync::Message` writes) so that the payload can pass our guards in `validate`
//! before yrs decodes anything; server messages are framed by
//! [`chorus_protocol::y_websocket`].

use super::native::{AppendDone, AppendFuture, ErrorBudget, start_append};
use super::{ConnContext, HeldWake, Session, Step};
use crate::auth::{Access, Principal};
use crate::backplane::Origin;
use crate::doc::outbox::Outbox;
use crate::doc::{DocHandle, LOAD_WAIT, Readiness, Registry};
use crate::validate::{self, Lib0Reader};
use bytes::Bytes;
use chorus_protocol::y_websocket::{
    self as yws, MSG_AUTH, MSG_AWARENESS, MSG_QUERY_AWARENESS, MSG_SYNC, MSG_SYNC_STEP_1,
    MSG_SYNC_STEP_2, MSG_SYNC_UPDATE,
};
use chorus_protocol::{CloseCode, DocId};
use futures_util::stream::FuturesUnordered;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use tokio::time::Instant;
use yrs::StateVector;

/// One y-websocket message from a client, decoded and checked by `validate`.
#[derive(Debug)]
pub enum Incoming<'a> {
    SyncStep1(StateVector),
    /// Sync step 2 or an update: both carry a v1 update to append (not yet checked).
    Update(&'a [u8]),
    Awareness(yrs::sync::awareness::AwarenessUpdate),
    QueryAwareness,
    /// Clients do not send auth messages in y-websocket; ignored rather than failed.
    Auth,
}

/// Decodes one client message. Everything yrs decodes here passed the bounds-checked pre-scan;
/// updates are left to `validate::check_update` on the write path.
pub fn parse_message(bytes: &[u8], max_update_bytes: usize) -> Result<Incoming<'_>, &'static str> {
    let mut r = Lib0Reader::new(bytes);
    let tag = r.var_u64().map_err(|_| "empty message")?;
    match u8::try_from(tag) {
        Ok(MSG_SYNC) => {
            let (Ok(sub), Ok(payload)) = (r.var_u64(), r.buf()) else {
                return Err("truncated sync message");
            };
            match u8::try_from(sub) {
                Ok(MSG_SYNC_STEP_1) => validate::decode_state_vector(payload)
                    .map(Incoming::SyncStep1)
                    .map_err(|_| "invalid state vector"),
                Ok(MSG_SYNC_STEP_2 | MSG_SYNC_UPDATE) => Ok(Incoming::Update(payload)),
                _ => Err("unknown sync message"),
            }
        }
        Ok(MSG_AWARENESS) => {
            let payload = r.buf().map_err(|_| "truncated awareness message")?;
            validate::decode_awareness(payload, max_update_bytes)
                .map(Incoming::Awareness)
                .map_err(|_| "invalid awareness update")
        }
        Ok(MSG_QUERY_AWARENESS) => Ok(Incoming::QueryAwareness),
        Ok(MSG_AUTH) => Ok(Incoming::Auth),
        _ => Err("unknown message type"),
    }
}

pub struct YjsSession {
    ctx: Arc<ConnContext>,
    registry: Arc<Registry>,
    config: Arc<crate::Config>,
    outbox: Arc<Outbox>,
    doc: DocId,
    handle: Option<DocHandle>,
    inflight: FuturesUnordered<AppendFuture>,
    errors: ErrorBudget,
    principal: Principal,
    /// The client was told (once) that it may not write.
    told_read_only: bool,
    /// Clocks this socket's admitted appends reach, per yrs client (see the native session).
    own: HashMap<u64, u64>,
    /// Updates waiting for what they build on, oldest first (see `hold`).
    held: VecDeque<Held>,
    held_bytes: usize,
    /// While something is held: tells when the document learned more.
    known: Option<watch::Receiver<u64>>,
}

impl YjsSession {
    pub fn new(
        ctx: Arc<ConnContext>,
        outbox: Arc<Outbox>,
        doc: DocId,
        handle: DocHandle,
        principal: Principal,
    ) -> Self {
        ctx.set_holder(&outbox, principal.clone());
        YjsSession {
            registry: ctx.registry.clone(),
            config: ctx.config.clone(),
            ctx,
            outbox,
            doc,
            handle: Some(handle),
            inflight: FuturesUnordered::new(),
            errors: ErrorBudget::new(),
            principal,
            told_read_only: false,
            own: HashMap::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            known: None,
        }
    }

    /// y-websocket has no error message; a bad message is logged and counted, and a client
    /// that keeps sending them is closed with 1008.
    fn bad(&mut self, what: &str) -> Step {
        tracing::debug!(conn = self.outbox.conn, doc = %self.doc, what, "bad y-websocket message");
        if self.errors.spend() {
            Step::Continue
        } else {
            Step::Close(CloseCode::PolicyViolation)
        }
    }

    async fn append(&mut self, update: &[u8]) -> Step {
        if self.principal.access(&self.doc) != Some(Access::Write) {
            // Read-only: never appended. The client hears it once (y-protocols permission
            // denied); later writes are dropped and counted.
            self.ctx.refused_writes.fetch_add(1, Ordering::Relaxed);
            if !std::mem::replace(&mut self.told_read_only, true) {
                let msg =
                    yws::permission_denied("read-only: this token may not write to the document");
                self.outbox.push_control(Bytes::from(msg));
            }
            return Step::Continue;
        }
        let size = self.handle.as_ref().map_or(0, DocHandle::approx_size);
        if size + update.len() > self.config.max_document_bytes {
            // Documented: a full document is read-only; y-websocket clients are told with the
            // protocol's permission-denied message (they keep the socket and keep reading).
            let msg =
                yws::permission_denied("document size limit reached; it takes no more updates");
            if !self.outbox.push_control(Bytes::from(msg)) {
                return Step::Close(CloseCode::PolicyViolation);
            }
            return Step::Continue;
        }
        let update = Bytes::copy_from_slice(update);
        let checked = match validate::check_update(&update, self.config.max_update_bytes) {
            // Every y-websocket client answers our step 1 with a step 2, usually empty: nothing
            // to log.
            Ok(checked) if checked.deps.is_empty() => return Step::Continue,
            Ok(checked) => checked,
            Err(validate::Rejected::TooLarge(..) | validate::Rejected::TooManyClients(..)) => {
                return Step::Close(CloseCode::MessageTooBig);
            }
            Err(_) => return self.bad("invalid update"),
        };
        let Some(handle) = self.handle.clone() else {
            return Step::Close(CloseCode::InternalError);
        };
        handle.forget_known(&mut self.own);
        if handle.readiness_now(&checked.deps, &self.own) == Some(Readiness::Met) {
            if let Step::Close(code) = self.admit(update, &checked.deps, checked.reach) {
                return Step::Close(code);
            }
            return if self.held.is_empty() {
                Step::Continue
            } else {
                // What it brought may be what a held update was waiting for.
                self.admit_held()
            };
        }
        self.hold(&handle, update, checked)
    }

    /// Appends an update whose dependencies are met; later updates of this socket may build on
    /// it before the document has applied it.
    fn admit(&mut self, update: Bytes, deps: &validate::Deps, reach: validate::Reach) -> Step {
        // Checked at the append, not only on arrival: a held update may be admitted long after
        // its token was revoked (or expired).
        if let Err(e) = self.ctx.admit_write(&self.principal) {
            return Step::Close(e.close_code());
        }
        for (client, end) in deps.ends() {
            let reach = self.own.entry(client).or_default();
            *reach = (*reach).max(end);
        }
        let origin = Origin {
            node: self.registry.node(),
            conn: self.outbox.conn,
            seq: None,
            // One chain for the socket's life: a failed append closes it (see `on_appended`),
            // and the log refuses the appends still queued behind the failed one.
            chain: 0,
        };
        self.inflight.push(start_append(
            &self.registry,
            &self.doc,
            update,
            Some(reach),
            origin,
        ));
        Step::Continue
    }

    /// An update that builds on something the document does not have yet waits here, in
    /// order, while the socket keeps being read: a stock client sends its live updates as soon
    /// as its socket opens, before the sync reply that carries what they build on, and that
    /// reply must be read for them to be admitted.
    fn hold(&mut self, handle: &DocHandle, update: Bytes, checked: validate::Checked) -> Step {
        if self.held.len() >= MAX_HELD || self.held_bytes + update.len() > self.held_budget() {
            return self.refuse_missing();
        }
        if self.held.is_empty() {
            let mut changes = handle.known_changes();
            changes.borrow_and_update();
            self.known = Some(changes);
        }
        // A document still loading can take longer than the usual wait to know its state.
        let wait = if !handle.is_loaded() {
            self.config.missing_deps_wait.max(LOAD_WAIT)
        } else {
            self.config.missing_deps_wait
        };
        self.held_bytes += update.len();
        self.held.push_back(Held {
            update,
            deps: checked.deps,
            reach: checked.reach,
            until: Instant::now() + wait,
        });
        Step::Continue
    }

    /// Admits every held update that is now met (in order, each making way for the next),
    /// then refuses those whose wait is over.
    fn admit_held(&mut self) -> Step {
        let Some(handle) = self.handle.clone() else {
            return Step::Continue;
        };
        if let Some(known) = &mut self.known {
            known.borrow_and_update();
        }
        handle.forget_known(&mut self.own);
        let mut progress = true;
        while progress {
            progress = false;
            let mut i = 0;
            while i < self.held.len() {
                if handle.readiness_now(&self.held[i].deps, &self.own) == Some(Readiness::Met) {
                    let Some(h) = self.held.remove(i) else { break };
                    self.held_bytes -= h.update.len();
                    if let Step::Close(code) = self.admit(h.update, &h.deps, h.reach) {
                        return Step::Close(code);
                    }
                    progress = true;
                } else {
                    i += 1;
                }
            }
        }
        let now = Instant::now();
        while self.held.front().is_some_and(|h| h.until <= now) {
            if let Some(h) = self.held.pop_front() {
                self.held_bytes -= h.update.len();
            }
            if let Step::Close(code) = self.refuse_missing() {
                return Step::Close(code);
            }
        }
        if self.held.is_empty() {
            self.known = None;
        }
        Step::Continue
    }

    fn refuse_missing(&mut self) -> Step {
        self.ctx
            .refused_missing_deps
            .fetch_add(1, Ordering::Relaxed);
        let msg = yws::permission_denied(
            "update refused: it builds on changes this document does not have",
        );
        if !self.outbox.push_control(Bytes::from(msg)) {
            return Step::Close(CloseCode::PolicyViolation);
        }
        self.bad("update with missing dependencies")
    }

    /// Bytes of updates one socket may hold back: a few of the largest updates.
    fn held_budget(&self) -> usize {
        self.config.max_update_bytes.saturating_mul(2)
    }
}

/// An update waiting for what it builds on (see `YjsSession::hold`).
struct Held {
    update: Bytes,
    deps: validate::Deps,
    reach: validate::Reach,
    until: Instant,
}

/// Updates one y-websocket socket may hold back at once; past this (or its byte budget) a new
/// one that cannot be admitted is refused at once.
const MAX_HELD: usize = 64;

impl Session for YjsSession {
    async fn on_binary(&mut self, bytes: Bytes) -> Step {
        let Some(handle) = self.handle.clone() else {
            return Step::Close(CloseCode::InternalError);
        };
        let conn = self.outbox.conn;
        let sent = match parse_message(&bytes, self.config.max_update_bytes) {
            Ok(Incoming::SyncStep1(sv)) => handle.sync_step1(conn, sv).await,
            Ok(Incoming::Update(payload)) => return self.append(payload).await,
            Ok(Incoming::Awareness(update)) => handle.awareness(conn, update).await,
            Ok(Incoming::QueryAwareness) => handle.query_awareness(conn).await,
            Ok(Incoming::Auth) => Ok(()),
            Err(what) => return self.bad(what),
        };
        match sent {
            Ok(()) => Step::Continue,
            // The document unloaded under a live socket (it should not while we hold it); the
            // client reconnects and syncs.
            Err(_) => Step::Close(CloseCode::InternalError),
        }
    }

    /// y-websocket has no error message for this: reading slows down instead (backpressure),
    /// so no update a stock client sent is ever dropped.
    fn on_rate_limited(&mut self) -> Option<Step> {
        None
    }

    fn inflight(&mut self) -> &mut FuturesUnordered<AppendFuture> {
        &mut self.inflight
    }

    fn on_appended(&mut self, done: AppendDone) -> Step {
        match done.result {
            Ok(_) => Step::Continue,
            Err(e) => {
                // The client believes it sent this update. Closing makes it reconnect and send
                // its state again (sync step 2), so nothing it holds is lost.
                tracing::warn!(doc = %done.doc, error = %e, "append failed; closing y-websocket client so it resyncs");
                self.own.clear();
                Step::Close(CloseCode::InternalError)
            }
        }
    }

    fn documents(&mut self) -> Vec<DocHandle> {
        self.handle.take().into_iter().collect()
    }

    fn expires_at(&self) -> Option<u64> {
        self.principal.exp
    }

    /// y-websocket has no way to refresh a token: the socket is simply closed at expiry.
    fn warn_expiring(&mut self) {}

    fn held(&self) -> Option<HeldWake> {
        let changed = self.known.clone()?;
        let until = self.held.front()?.until;
        Some(HeldWake { changed, until })
    }

    fn on_held_wake(&mut self) -> Step {
        self.admit_held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::sync::{Message, SyncMessage};
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;

    #[test]
    fn hand_framed_messages_match_yrs() {
        let sv = StateVector::default();
        assert_eq!(
            yws::sync_step1(&sv.encode_v1()),
            Message::Sync(SyncMessage::SyncStep1(sv.clone())).encode_v1()
        );
        assert_eq!(yws::sync_step1(&sv.encode_v1()), vec![0, 0, 1, 0]);
        let big = vec![7u8; 300];
        assert_eq!(
            yws::sync_update(&big),
            Message::Sync(SyncMessage::Update(big.clone())).encode_v1()
        );
        assert_eq!(
            yws::sync_step2(&[0, 0]),
            Message::Sync(SyncMessage::SyncStep2(vec![0, 0])).encode_v1()
        );
        let decoded = Message::decode_v1(&yws::awareness(&[1, 5, 1, 4, b'n', b'u', b'l', b'l']));
        assert!(matches!(decoded, Ok(Message::Awareness(_))));
        assert_eq!(
            Message::decode_v1(&yws::permission_denied("full")).ok(),
            Some(Message::Auth(Some("full".into())))
        );
    }
}
