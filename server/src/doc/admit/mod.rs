//! The write door (data-flow step 2): every update a client sends, over the native protocol,
//! y-websocket or `POST /v1/docs/{doc}`, passes here on its way from the connection into the log.
//!
//! The steps, in this order, for every protocol:
//!
//! 1. **access** ([`Door::check`]): the principal holds a write grant for the document;
//! 2. **validation** ([`Door::check`]): [`validate::check_update`] (update size, structure,
//!    trial apply), which also yields what the update builds on;
//! 3. **size** ([`Door::admit`], [`Door::offer`]): the document stays under
//!    `--max-document-bytes`;
//! 4. **dependency wait**: what the update builds on must be in the document, or in this
//!    writer's own admitted appends (which the document may not have applied yet);
//! 5. **token, again**: a wait may outlast the token (revoked or expired meanwhile), so the
//!    principal is checked at the append, not only when the socket or request began;
//! 6. **writer clocks**: the clocks this append reaches are remembered for the writer's next
//!    update (step 4);
//! 7. **origin and append**: the entry carries the socket and its append chain (see
//!    `backplane::Chains`), so the writer is acked rather than echoed, and the log refuses
//!    appends queued behind one of the same chain that failed.
//!
//! Why in `doc/`: every step reads the document (its handle, its known clocks, the log behind
//! it) or the node's auth, none reads a socket, and the HTTP API has no connection at all. The
//! door knows no wire either: a refusal is a [`Refusal`], and what each protocol does with one
//! (error code, close code, HTTP status, y-websocket answer) is read from the one table of
//! [`Refusal`]'s methods. The connection keeps only its framing.
//!
//! Why validation before size: the HTTP API must not load a document for a request whose body
//! is garbage, and it learns the size only once the document is loaded; putting validation
//! first for everyone makes an update that is both invalid and aimed at a full document get
//! the same answer on every protocol. Validation is bounded by `--max-update-bytes` either way.
//!
//! Two ways to wait for dependencies, one pipeline. [`Door::admit`] waits inline (bounded by
//! `--missing-deps-wait`): the native socket stops reading meanwhile, so its appends keep the
//! order it sent them in, and an HTTP request simply takes longer. A stock y-websocket client
//! sends live updates before the sync reply that carries what they build on, so its socket must
//! keep being read: [`Door::offer`] holds such updates, in order and bounded ([`Holding`]),
//! and [`Door::release`] admits them once the document has caught up. Both end in the same
//! steps 5 to 7.
//!
//! Rate is not a step here: messages per second are counted by the connection before a frame
//! is even parsed (and HTTP requests per address before routing), which is where the cost they
//! guard against begins.

use crate::auth::{Access, Auth, AuthError, Principal};
use crate::backplane::{Backplane, BackplaneError, Origin};
use crate::doc::{ConnId, DocHandle, LOAD_WAIT, Readiness};
use crate::validate::{self, Checked, Deps, Reach, Rejected};
use axum::http::StatusCode;
use bytes::Bytes;
use chorus_protocol::{CloseCode, DocId, ErrorCode, Position};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why an update was not appended. The methods below are the one table of what each protocol
/// answers.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the token grants only read access to this document")]
    ReadOnly,
    #[error("the document reached the {0}-byte limit and takes no more updates")]
    DocumentFull(usize),
    /// Over `--max-update-bytes`, or naming more clients than an update may.
    #[error("{0}")]
    TooLarge(Rejected),
    #[error("{0}")]
    Invalid(Rejected),
    #[error("the update builds on changes this document does not have")]
    MissingDependencies,
    /// It continues the writer's own update whose append failed: our fault, not the client's.
    #[error("the update builds on one of yours that could not be appended; send your state again")]
    Lost,
    /// The token stopped being valid (revoked, expired) before the append.
    #[error(transparent)]
    Token(AuthError),
    /// The log did not take the update.
    #[error(transparent)]
    AppendFailed(BackplaneError),
}

/// Whose fault a refusal is: a client's own faults count against its error budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Server,
}

/// What a y-websocket socket does with a refusal. The protocol has no error message; its
/// permission-denied message is the closest a stock client shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YjsAnswer {
    /// Permission-denied the first time on this socket; later ones are dropped silently.
    DenyOnce(&'static str),
    /// Permission-denied every time; the socket is kept (and closed with 1008 only when even
    /// that message cannot be queued).
    Deny(&'static str),
    /// Permission-denied, and counted against the socket's error budget.
    DenyAndCharge(&'static str),
    /// Dropped, and counted against the socket's error budget.
    Charge,
    /// Closed with this code.
    Close(CloseCode),
}

impl Refusal {
    fn rejected(e: Rejected) -> Self {
        match e {
            Rejected::TooLarge(..) | Rejected::TooManyClients(..) => Refusal::TooLarge(e),
            e => Refusal::Invalid(e),
        }
    }

    /// The native protocol's `error` frame code.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Refusal::ReadOnly => ErrorCode::ReadOnly,
            Refusal::DocumentFull(_) => ErrorCode::DocumentTooLarge,
            Refusal::TooLarge(_) => ErrorCode::TooLarge,
            Refusal::Invalid(_) => ErrorCode::BadUpdate,
            Refusal::MissingDependencies | Refusal::Lost => ErrorCode::MissingDependencies,
            Refusal::Token(_) => ErrorCode::Forbidden,
            Refusal::AppendFailed(_) => ErrorCode::AppendFailed,
        }
    }

    /// Failures on our side do not count against the client; everything else does.
    pub fn fault(&self) -> Fault {
        match self {
            Refusal::Lost | Refusal::AppendFailed(_) => Fault::Server,
            _ => Fault::Client,
        }
    }

    /// The native socket is closed after the error frame (with this code) only when its token
    /// stopped being valid: nothing it sends can be admitted any more.
    pub fn native_close(&self) -> Option<CloseCode> {
        match self {
            Refusal::Token(e) => Some(e.close_code()),
            _ => None,
        }
    }

    /// The HTTP API's status and the `error` code in its JSON body.
    pub fn http(&self) -> (StatusCode, &'static str) {
        match self {
            Refusal::ReadOnly => (StatusCode::FORBIDDEN, "forbidden"),
            Refusal::DocumentFull(_) => (StatusCode::PAYLOAD_TOO_LARGE, "document_too_large"),
            Refusal::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Refusal::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_update"),
            Refusal::MissingDependencies | Refusal::Lost => {
                (StatusCode::CONFLICT, "missing_dependencies")
            }
            // As for a token refused when the request began.
            Refusal::Token(e) => e.http(),
            Refusal::AppendFailed(_) => (StatusCode::SERVICE_UNAVAILABLE, "append_failed"),
        }
    }

    /// What a y-websocket socket does.
    pub fn yjs(&self) -> YjsAnswer {
        match self {
            // Every stock client answers our sync step 1 with a step 2: a read-only one would
            // be told on every reconnect, and its later edits would each be told again.
            Refusal::ReadOnly => {
                YjsAnswer::DenyOnce("read-only: this token may not write to the document")
            }
            // Documented: a full document is read-only; the client keeps the socket and reads.
            Refusal::DocumentFull(_) => {
                YjsAnswer::Deny("document size limit reached; it takes no more updates")
            }
            Refusal::TooLarge(_) => YjsAnswer::Close(CloseCode::MessageTooBig),
            Refusal::Invalid(_) => YjsAnswer::Charge,
            Refusal::MissingDependencies => YjsAnswer::DenyAndCharge(
                "update refused: it builds on changes this document does not have",
            ),
            Refusal::Token(e) => YjsAnswer::Close(e.close_code()),
            // The client believes it sent the update. Closing makes it reconnect and send its
            // state again (sync step 2), so nothing it holds is lost.
            Refusal::Lost | Refusal::AppendFailed(_) => YjsAnswer::Close(CloseCode::InternalError),
        }
    }
}

/// The door's limits, from the node's config.
#[derive(Debug, Clone, Copy)]
pub struct WriteLimits {
    pub max_update_bytes: usize,
    pub max_document_bytes: usize,
    /// How long an update may wait for what it builds on (`--missing-deps-wait`).
    pub missing_deps_wait: Duration,
}

/// What the door refused, for `/v1/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct AdmitStats {
    /// Writes refused because a token granted only read access (or none), or stopped being
    /// valid before the append.
    pub refused_writes: AtomicU64,
    /// Updates refused because what they build on never reached the document.
    pub refused_missing_deps: AtomicU64,
}

/// An append in flight: which document and client `seq` it answers, and how it ended.
pub struct AppendDone {
    pub doc: DocId,
    pub seq: Option<u64>,
    /// The append chain it belonged to (see `backplane::Chains`).
    pub chain: u64,
    pub result: Result<Position, BackplaneError>,
}

pub type AppendFuture = BoxFuture<'static, AppendDone>;

/// One update on its way through the door, once it passed [`Door::check`].
pub struct Write {
    pub update: Bytes,
    pub checked: Checked,
    /// The native client's sequence number, echoed in its ack.
    pub seq: Option<u64>,
}

/// What the door remembers about one writer of one document between its updates.
#[derive(Debug, Default)]
pub struct Writer {
    /// The socket; `None` for an HTTP request, which is not acked and has no chain.
    conn: Option<ConnId>,
    /// The clocks this writer's admitted appends reach, per yrs client: its next update may
    /// build on its previous one before the document applied it.
    own: HashMap<u64, u64>,
    /// Yrs clients whose appends from this writer failed: their next updates build on
    /// something that will never arrive unless the client resends it.
    lost: HashSet<u64>,
    /// This writer's append chain: a new one starts when an append failed, so the log refuses
    /// the appends made before the writer heard (they may build on the failed one) and takes
    /// those made after.
    chain: u64,
}

impl Writer {
    pub fn socket(conn: ConnId) -> Self {
        Writer {
            conn: Some(conn),
            ..Writer::default()
        }
    }

    /// One HTTP request: it starts from nothing and ends with its append.
    pub fn request() -> Self {
        Writer::default()
    }

    fn origin(&self, node: u64, seq: Option<u64>) -> Option<Origin> {
        self.conn.map(|conn| Origin {
            node,
            conn,
            seq,
            chain: self.chain,
        })
    }

    /// Step 6: the update is admitted; the writer's next ones may build on it.
    fn admitted(&mut self, deps: &Deps) {
        for (client, end) in deps.ends() {
            let reach = self.own.entry(client).or_default();
            *reach = (*reach).max(end);
            self.lost.remove(&client);
        }
    }

    /// An append of `chain` failed and the writer is told (the native protocol): what its
    /// later updates may build on did not make it into the log, and its next appends start a
    /// new chain (once per failed chain: several failures of one chain start one new chain).
    pub fn append_failed(&mut self, chain: u64) {
        if self.chain == chain {
            self.chain += 1;
        }
        self.lost.extend(self.own.drain().map(|(client, _)| client));
    }

    /// Forgets the writer's own clocks (a y-websocket socket whose append failed: it closes,
    /// and its chain stays the failed one, so what it still had queued is refused by the log).
    pub fn forget_own(&mut self) {
        self.own.clear();
    }

    /// The socket unsubscribed from the document. Its clocks go; its chain stays if it ever
    /// failed, since the log may still remember the failed chain and a re-subscription must
    /// not start it over. Returns whether there is anything left to keep.
    pub fn unsubscribed(&mut self) -> bool {
        self.own = HashMap::new();
        self.lost = HashSet::new();
        self.chain != 0
    }
}

/// Updates one y-websocket socket may hold back at once; past this (or its byte budget) a new
/// one that cannot be admitted is refused at once.
pub const MAX_HELD: usize = 64;

/// A writer's updates waiting for what they build on, oldest first (see [`Door::offer`]).
#[derive(Default)]
pub struct Holding {
    queue: VecDeque<Held>,
    bytes: usize,
    /// While something is held: tells when the document learned more.
    known: Option<watch::Receiver<u64>>,
}

struct Held {
    update: Bytes,
    deps: Deps,
    /// The scan's result, carried to the owner with the entry (see [`Reach`]).
    reach: Reach,
    until: Instant,
}

impl Holding {
    /// When to look at the held updates again: the document learned more (the receiver
    /// changes), or the oldest one's wait ends. `None` while nothing is held.
    pub fn wake(&self) -> Option<(watch::Receiver<u64>, Instant)> {
        Some((self.known.clone()?, self.queue.front()?.until))
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether `len` more bytes fit: a few of the largest updates, at most [`MAX_HELD`].
    fn has_room(&self, len: usize, max_update_bytes: usize) -> bool {
        self.queue.len() < MAX_HELD && self.bytes + len <= max_update_bytes.saturating_mul(2)
    }

    fn push(&mut self, held: Held) {
        self.bytes += held.update.len();
        self.queue.push_back(held);
    }

    /// Drops the held updates (oldest first) whose wait is over at `now`; returns how many.
    fn expire(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while self.queue.front().is_some_and(|h| h.until <= now) {
            if let Some(h) = self.queue.pop_front() {
                self.bytes -= h.update.len();
                expired += 1;
            }
        }
        expired
    }
}

/// The node's write door (one per node, shared by every connection and request).
pub struct Door {
    node: u64,
    backplane: Arc<dyn Backplane>,
    auth: Arc<Auth>,
    limits: WriteLimits,
    pub stats: AdmitStats,
    /// Told of every acknowledged append when change webhooks are on (set once at start).
    pub webhooks: std::sync::OnceLock<crate::webhook::Webhooks>,
}

impl Door {
    pub fn new(
        node: u64,
        backplane: Arc<dyn Backplane>,
        auth: Arc<Auth>,
        limits: WriteLimits,
    ) -> Self {
        Door {
            node,
            backplane,
            auth,
            limits,
            stats: AdmitStats::default(),
            webhooks: std::sync::OnceLock::new(),
        }
    }

    fn refused_write(&self) {
        self.stats.refused_writes.fetch_add(1, Ordering::Relaxed);
    }

    fn refused_missing(&self, n: usize) {
        self.stats
            .refused_missing_deps
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Steps 1 and 2, which need no document: access and validation.
    pub fn check(
        &self,
        principal: &Principal,
        doc: &DocId,
        update: &Bytes,
    ) -> Result<Checked, Refusal> {
        if principal.access(doc) != Some(Access::Write) {
            self.refused_write();
            return Err(Refusal::ReadOnly);
        }
        validate::check_update(update, self.limits.max_update_bytes).map_err(Refusal::rejected)
    }

    /// Step 3.
    fn fits(&self, handle: &DocHandle, len: usize) -> Result<(), Refusal> {
        let limit = self.limits.max_document_bytes;
        if handle.approx_size() + len > limit {
            return Err(Refusal::DocumentFull(limit));
        }
        Ok(())
    }

    /// Checks and admits `update` (steps 1 to 7), waiting inline for its dependencies.
    pub async fn admit(
        &self,
        principal: &Principal,
        handle: &DocHandle,
        writer: &mut Writer,
        update: Bytes,
        seq: Option<u64>,
    ) -> Result<AppendFuture, Refusal> {
        let checked = self.check(principal, handle.doc(), &update)?;
        let write = Write {
            update,
            checked,
            seq,
        };
        self.admit_checked(principal, handle, writer, write).await
    }

    /// Steps 3 to 7 for an update that passed [`Self::check`], waiting inline for its
    /// dependencies (bounded by `--missing-deps-wait`).
    pub async fn admit_checked(
        &self,
        principal: &Principal,
        handle: &DocHandle,
        writer: &mut Writer,
        write: Write,
    ) -> Result<AppendFuture, Refusal> {
        self.fits(handle, write.update.len())?;
        let deps = &write.checked.deps;
        handle.forget_known(&mut writer.own);
        let readiness = handle
            .wait_ready(
                deps,
                Some(&writer.own),
                // Only a writer whose append failed has anything to look up here.
                (!writer.lost.is_empty()).then_some(&writer.lost),
                self.limits.missing_deps_wait,
            )
            .await;
        match readiness {
            Readiness::Met => {}
            Readiness::Missing => {
                self.refused_missing(1);
                return Err(Refusal::MissingDependencies);
            }
            Readiness::Lost => {
                self.refused_missing(1);
                return Err(Refusal::Lost);
            }
        }
        self.pass(principal, writer, deps)?;
        Ok(self.append(
            handle.doc(),
            write.update,
            Some(write.checked.reach),
            writer.origin(self.node, write.seq),
        ))
    }

    /// Steps 3 to 7 for an update that passed [`Self::check`], without waiting: admitted now
    /// if what it builds on is known, else held in `holding` (bounded) until
    /// [`Self::release`] finds it met or its wait over. Appends started go into `appends`.
    /// `Ok(n)`: `n` held updates expired meanwhile, each a [`Refusal::MissingDependencies`].
    pub fn offer(
        &self,
        principal: &Principal,
        handle: &DocHandle,
        writer: &mut Writer,
        holding: &mut Holding,
        write: Write,
        appends: &mut impl Extend<AppendFuture>,
    ) -> Result<usize, Refusal> {
        self.fits(handle, write.update.len())?;
        let Checked { deps, reach } = write.checked;
        handle.forget_known(&mut writer.own);
        if handle.readiness_now(&deps, &writer.own) == Some(Readiness::Met) {
            self.pass(principal, writer, &deps)?;
            let origin = writer.origin(self.node, write.seq);
            appends.extend([self.append(handle.doc(), write.update, Some(reach), origin)]);
            return if holding.is_empty() {
                Ok(0)
            } else {
                // What it brought may be what a held update was waiting for.
                self.release(principal, handle, writer, holding, appends)
            };
        }
        if !holding.has_room(write.update.len(), self.limits.max_update_bytes) {
            self.refused_missing(1);
            return Err(Refusal::MissingDependencies);
        }
        if holding.is_empty() {
            let mut changes = handle.known_changes();
            changes.borrow_and_update();
            holding.known = Some(changes);
        }
        // A document still loading can take longer than the usual wait to know its state.
        let wait = if handle.is_loaded() {
            self.limits.missing_deps_wait
        } else {
            self.limits.missing_deps_wait.max(LOAD_WAIT)
        };
        holding.push(Held {
            update: write.update,
            deps,
            reach,
            until: Instant::now() + wait,
        });
        Ok(0)
    }

    /// Admits every held update that is now met (in order, each making way for the next),
    /// then drops those whose wait is over: `Ok(n)`, `n` of them, each a
    /// [`Refusal::MissingDependencies`].
    pub fn release(
        &self,
        principal: &Principal,
        handle: &DocHandle,
        writer: &mut Writer,
        holding: &mut Holding,
        appends: &mut impl Extend<AppendFuture>,
    ) -> Result<usize, Refusal> {
        if let Some(known) = &mut holding.known {
            known.borrow_and_update();
        }
        handle.forget_known(&mut writer.own);
        let mut progress = true;
        while progress {
            progress = false;
            let mut i = 0;
            while i < holding.queue.len() {
                let h = &holding.queue[i];
                if handle.readiness_now(&h.deps, &writer.own) != Some(Readiness::Met) {
                    i += 1;
                    continue;
                }
                let Some(h) = holding.queue.remove(i) else {
                    break;
                };
                holding.bytes -= h.update.len();
                self.pass(principal, writer, &h.deps)?;
                let origin = writer.origin(self.node, None);
                appends.extend([self.append(handle.doc(), h.update, Some(h.reach), origin)]);
                // It may be what one already passed over waits for: another round.
                progress = true;
            }
        }
        let expired = holding.expire(Instant::now());
        self.refused_missing(expired);
        if holding.is_empty() {
            holding.known = None;
        }
        Ok(expired)
    }

    /// Steps 5 and 6: the token is still valid now (after any wait), and the writer's clocks
    /// grow by the update.
    fn pass(&self, principal: &Principal, writer: &mut Writer, deps: &Deps) -> Result<(), Refusal> {
        if let Err(e) = self.auth.still_valid(principal) {
            self.refused_write();
            return Err(Refusal::Token(e));
        }
        writer.admitted(deps);
        Ok(())
    }

    /// Step 7: starts the append and wraps its outcome with what answers it.
    fn append(
        &self,
        doc: &DocId,
        update: Bytes,
        reach: Option<Reach>,
        origin: Option<Origin>,
    ) -> AppendFuture {
        let fut = self.backplane.append(doc, update, reach, origin);
        let (doc, seq, chain) = (
            doc.clone(),
            origin.and_then(|o| o.seq),
            origin.map_or(0, |o| o.chain),
        );
        let started = std::time::Instant::now();
        let webhooks = self.webhooks.get().cloned();
        fut.map(move |result| {
            let hot = crate::metrics::hot();
            hot.append_seconds.record(started.elapsed().as_secs_f64());
            if let (Ok(_), Some(hooks)) = (&result, &webhooks) {
                hooks.note(&doc);
            }
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
}

#[cfg(test)]
mod tests;
