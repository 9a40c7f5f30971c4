//! The y-websocket session (`/y/{doc}`): stock Yjs clients, one document per socket, one
//! y-protocols message per WebSocket frame (stable y-websocket clients read only the first
//! message of a frame).
//!
//! Client messages are parsed by hand here (a type byte and a length-prefixed payload, the same
//! bytes `yrs::sync::Message` writes) so that the payload can pass our guards in `validate`
//! before yrs decodes anything; server messages are framed by
//! [`chorus_protocol::y_websocket`], through the [`super::wires::Y_WEBSOCKET`] wire for
//! everything a document sends.

use super::native::{AppendDone, AppendFuture, ErrorBudget};
use super::{ConnContext, HeldWake, Session, Step};
use crate::auth::Principal;
use crate::doc::DocHandle;
use crate::doc::admit::{Holding, Refusal, Write, Writer, YjsAnswer};
use crate::doc::outbox::Outbox;
use crate::validate::{self, Lib0Reader};
use bytes::Bytes;
use chorus_protocol::y_websocket::{
    self as yws, MSG_AUTH, MSG_AWARENESS, MSG_QUERY_AWARENESS, MSG_SYNC, MSG_SYNC_STEP_1,
    MSG_SYNC_STEP_2, MSG_SYNC_UPDATE,
};
use chorus_protocol::{CloseCode, DocId};
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
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
    config: Arc<crate::Config>,
    outbox: Arc<Outbox>,
    doc: DocId,
    handle: Option<DocHandle>,
    inflight: FuturesUnordered<AppendFuture>,
    errors: ErrorBudget,
    principal: Principal,
    /// The client was told (once) what [`YjsAnswer::DenyOnce`] tells.
    told_once: bool,
    /// What the write door remembers of this socket as a writer.
    writer: Writer,
    /// Updates waiting for what they build on (see `Door::offer`).
    holding: Holding,
}

impl YjsSession {
    pub fn new(
        ctx: Arc<ConnContext>,
        outbox: Arc<Outbox>,
        doc: DocId,
        handle: DocHandle,
        principal: Principal,
    ) -> Self {
        // y-websocket has no way to refresh a token: the socket is simply closed at expiry.
        ctx.set_holder(&outbox, principal.clone(), None);
        YjsSession {
            writer: Writer::socket(outbox.conn),
            config: ctx.config.clone(),
            ctx,
            outbox,
            doc,
            handle: Some(handle),
            inflight: FuturesUnordered::new(),
            errors: ErrorBudget::new(),
            principal,
            told_once: false,
            holding: Holding::default(),
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

    /// Sync step 2 or an update: through the write door, holding it while what it builds on
    /// is on its way (the socket keeps being read meanwhile).
    fn append(&mut self, update: &[u8]) -> Step {
        // Copied before the check: the scan's result is keyed to these very bytes.
        let update = Bytes::copy_from_slice(update);
        let checked = match self.ctx.door.check(&self.principal, &self.doc, &update) {
            // Every y-websocket client answers our step 1 with a step 2, usually empty: nothing
            // to log.
            Ok(checked) if checked.deps.is_empty() => return Step::Continue,
            Ok(checked) => checked,
            Err(refusal) => return self.refuse(&refusal),
        };
        let Some(handle) = self.handle.clone() else {
            return Step::Close(CloseCode::InternalError);
        };
        let write = Write {
            update,
            checked,
            seq: None,
        };
        let offered = self.ctx.door.offer(
            &self.principal,
            &handle,
            &mut self.writer,
            &mut self.holding,
            write,
            &mut self.inflight,
        );
        self.answer(offered)
    }

    /// Looks at the held updates again: admits those now met, refuses those whose wait ended.
    fn release(&mut self) -> Step {
        let Some(handle) = self.handle.clone() else {
            return Step::Continue;
        };
        let released = self.ctx.door.release(
            &self.principal,
            &handle,
            &mut self.writer,
            &mut self.holding,
            &mut self.inflight,
        );
        self.answer(released)
    }

    /// `Ok(n)`: `n` held updates waited in vain, each refused.
    fn answer(&mut self, outcome: Result<usize, Refusal>) -> Step {
        match outcome {
            Ok(expired) => {
                for _ in 0..expired {
                    if let Step::Close(code) = self.refuse(&Refusal::MissingDependencies) {
                        return Step::Close(code);
                    }
                }
                Step::Continue
            }
            Err(refusal) => self.refuse(&refusal),
        }
    }

    /// Answers a refusal of the write door, as its table says (see [`Refusal::yjs`]).
    fn refuse(&mut self, refusal: &Refusal) -> Step {
        let deny = |outbox: &Outbox, reason: &str| {
            outbox.push_control(Bytes::from(yws::permission_denied(reason)))
        };
        match refusal.yjs() {
            YjsAnswer::DenyOnce(reason) => {
                if !std::mem::replace(&mut self.told_once, true) {
                    deny(&self.outbox, reason);
                }
                Step::Continue
            }
            YjsAnswer::Deny(reason) if !deny(&self.outbox, reason) => {
                Step::Close(CloseCode::PolicyViolation)
            }
            YjsAnswer::Deny(_) => Step::Continue,
            YjsAnswer::DenyAndCharge(reason) if !deny(&self.outbox, reason) => {
                Step::Close(CloseCode::PolicyViolation)
            }
            YjsAnswer::DenyAndCharge(_) | YjsAnswer::Charge => self.bad(&refusal.to_string()),
            YjsAnswer::Close(code) => Step::Close(code),
        }
    }
}

impl Session for YjsSession {
    async fn on_binary(&mut self, bytes: Bytes) -> Step {
        let Some(handle) = self.handle.clone() else {
            return Step::Close(CloseCode::InternalError);
        };
        let conn = self.outbox.conn;
        let sent = match parse_message(&bytes, self.config.max_update_bytes) {
            Ok(Incoming::SyncStep1(sv)) => handle.diff(conn, sv).await,
            Ok(Incoming::Update(payload)) => return self.append(payload),
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
                tracing::warn!(doc = %done.doc, error = %e, "append failed; closing y-websocket client so it resyncs");
                self.writer.forget_own();
                self.refuse(&Refusal::AppendFailed(e))
            }
        }
    }

    fn documents(&mut self) -> Vec<DocHandle> {
        self.handle.take().into_iter().collect()
    }

    fn held(&self) -> Option<HeldWake> {
        let (changed, until) = self.holding.wake()?;
        Some(HeldWake { changed, until })
    }

    fn on_held_wake(&mut self) -> Step {
        self.release()
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
