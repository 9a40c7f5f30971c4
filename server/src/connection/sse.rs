//! One-way HTTP readers (data-flow step 6 without a socket): Server-Sent Events and long-poll.
//!
//! Neither is a fork of the WebSocket path. Both subscribe through the same
//! [`Registry`](crate::doc::Registry) call and drain the same coalescing [`Outbox`] a WebSocket
//! connection does, so replay, merging of slow readers, the byte budget and the catch-up
//! behave identically. An event stream's outbox speaks the SSE wire ([`wires::SSE`]): the
//! document builds each event once for all of its SSE readers, and the pump only writes what
//! it drains. A long-poll's speaks native and this module merges its frames into one answer.
//!
//! Data on the wire: every document payload is a base64 yrs v1 update; every position is the
//! text form `epoch.ms-seq`, which is the SSE event `id:` and what `Last-Event-ID` or `after`
//! bring back.

use super::ConnContext;
use super::wires;
use crate::auth::Principal;
use crate::doc::outbox::Outbox;
use crate::doc::{DocError, DocHandle, SyncFrom};
use crate::limits::ConnectionSlot;
use bytes::Bytes;
use chorus_protocol::{CloseCode, DocId, Position, ServerFrame};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How long a node waits to apply a position a client brings from another node (the other
/// node may have read the log a few milliseconds earlier) before it answers with full state.
const AHEAD_WAIT: Duration = Duration::from_secs(1);

/// Longest a long-poll waits (`wait=` above this is capped): below the 60 s read timeout
/// most proxies default to, so a poll never looks like a dead upstream.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// A long-poll without `wait=`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(25);

/// Reconnect delay a browser `EventSource` uses after the stream ends (its `retry:` field).
const SSE_RETRY_MS: u64 = 1000;

/// What one SSE stream was asked for.
pub struct SseRequest {
    pub doc: DocId,
    pub principal: Principal,
    /// From `Last-Event-ID` (or `?after=`): replay after it when possible.
    pub from: Option<Position>,
    /// Send `event: awareness` (presence) too.
    pub presence: bool,
}

/// Subscribes the reader and starts its pump; the returned receiver is the response body.
/// Fails (before any byte of the answer) only if the document cannot be loaded.
///
/// Subscribing runs inside the tracked pump task, not in the request future: hyper drops a
/// request future whose client went away, and a subscription made there and never released
/// would keep the document hot with an outbox nobody drains.
pub async fn start_sse(
    ctx: Arc<ConnContext>,
    slot: ConnectionSlot,
    req: SseRequest,
) -> Result<mpsc::Receiver<Bytes>, DocError> {
    let (ready, answer) = oneshot::channel();
    let tracker = ctx.tracker.clone();
    tracker.spawn(async move {
        if let Some(p) = req.from {
            settle_ahead(&ctx, &req.doc, p).await;
        }
        let wire = if req.presence {
            &wires::SSE_PRESENCE
        } else {
            &wires::SSE
        };
        let outbox = ctx.new_outbox(wire);
        let from = SyncFrom {
            position: req.from,
            state_vector: None,
        };
        let handle = match ctx
            .registry
            .subscribe(&req.doc, outbox.conn, &outbox, &from)
            .await
        {
            Ok(h) => h,
            Err(e) => {
                outbox.close();
                ctx.forget_outbox(outbox.conn);
                let _ = ready.send(Err(e));
                return;
            }
        };
        // The sweep closes the stream (4101) when the token expires.
        ctx.set_holder(&outbox, req.principal.clone(), None);
        // One chunk in flight: the body is pulled by hyper only as fast as the socket takes
        // it, so everything else waits (merged) in the outbox, under its byte budget. If the
        // request is gone already, the pump sees the closed channel at once and cleans up.
        let (tx, rx) = mpsc::channel(1);
        let _ = ready.send(Ok(rx));
        pump(ctx, slot, outbox, handle, req, tx).await;
    });
    answer.await.map_err(|_| DocError::Unavailable)?
}

enum Wake {
    Gone,
    Shutdown,
    Drain,
}

/// A comment line: ignored by EventSource, but it keeps proxies from closing an idle stream
/// and finds readers that went away without a FIN. The node's sweep queues it every ping
/// interval (see `super::sweep`).
static KEEPALIVE: Bytes = Bytes::from_static(b": keepalive\n\n");

/// How an SSE stream ends, said to the reader in a last `event: close`.
fn close_event(code: CloseCode) -> Bytes {
    let data = serde_json::json!({"code": code.code(), "reason": code.reason()});
    Bytes::from(format!("event: close\ndata: {data}\n\n"))
}

/// Drains the reader's outbox into its response body until the reader goes, the node shuts
/// down, the token expires or is revoked, or the reader stops reading for the slow-client
/// timeout.
async fn pump(
    ctx: Arc<ConnContext>,
    slot: ConnectionSlot,
    outbox: Arc<Outbox>,
    handle: DocHandle,
    req: SseRequest,
    tx: mpsc::Sender<Bytes>,
) {
    let conn = outbox.conn;
    let stall = ctx.config.slow_client_timeout;
    let send = |chunk: Bytes| {
        let tx = tx.clone();
        async move {
            matches!(
                tokio::time::timeout(stall, tx.send(chunk)).await,
                Ok(Ok(()))
            )
        }
    };
    ctx.keep_alive(&outbox, &KEEPALIVE);
    let mut wake_at: Option<Instant> = None;
    let mut ok = send(Bytes::from(format!(
        "retry: {SSE_RETRY_MS}\n: chorus {} events\n\n",
        req.doc
    )))
    .await;
    while ok {
        let wake = tokio::select! {
            biased;
            _ = tx.closed() => Wake::Gone,
            _ = ctx.shutdown.cancelled() => Wake::Shutdown,
            _ = outbox.ready() => Wake::Drain,
            _ = super::sleep_until_opt(wake_at) => Wake::Drain,
        };
        match wake {
            Wake::Gone => break,
            Wake::Shutdown => {
                going_away(&outbox, &tx).await;
                break;
            }
            Wake::Drain => {
                let mut drained = outbox.drain();
                wake_at = drained.wake_at;
                drained.request_owed(conn).await;
                if let Some(code) = drained.close {
                    // Revoked, expired (see `super::sweep`) or the document failed: what
                    // waits is not sent any more.
                    let _ = send(close_event(code)).await;
                    break;
                }
                // Raw bytes are keepalive comments from the sweep: they go first, as is.
                let mut pieces = drained.raw;
                pieces.extend(drained.frames);
                if let Some(chunk) = chunk(pieces) {
                    ok = send(chunk).await;
                }
            }
        }
    }
    if !ok && !tx.is_closed() {
        tracing::info!(
            conn,
            "event-stream reader stopped reading; ending its stream"
        );
        ctx.stats
            .slow_closes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    handle.unsubscribe(conn).await;
    outbox.close();
    ctx.forget_outbox(conn);
    drop(slot);
}

/// The node shuts down: what is waiting goes out (bounded), then "going away"; the browser
/// reconnects (to another node, through the balancer) with Last-Event-ID.
async fn going_away(outbox: &Outbox, tx: &mpsc::Sender<Bytes>) {
    let mut chunk = outbox.drain().frames.concat();
    chunk.extend_from_slice(&close_event(CloseCode::GoingAway));
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Bytes::from(chunk))).await;
}

/// A drain's events as one chunk of the body, `None` when they say nothing. A single event
/// (a reader that keeps up) goes as the bytes the document built for every SSE reader, not a
/// copy of them.
fn chunk(mut events: Vec<Bytes>) -> Option<Bytes> {
    events.retain(|e| !e.is_empty());
    match events.len() {
        0 => None,
        1 => events.pop(),
        _ => Some(Bytes::from(events.concat())),
    }
}

/// A position handed out by another node may be a few milliseconds ahead of this node's
/// reader: wait (briefly) until this node has applied it, so the reader gets an exact replay
/// instead of a needless full state. A position from another epoch, or one the log cannot
/// hold (forged, far in the future), is not waited for.
async fn settle_ahead(ctx: &ConnContext, doc: &DocId, p: Position) {
    let current = ctx
        .registry
        .with_owner(doc, |h| async move {
            h.wait_applied(chorus_protocol::StreamId::ZERO).await
        })
        .await;
    if let Ok(current) = current
        && current.epoch == p.epoch
        && current.id < p.id
        && ctx.registry.backplane().may_hold(doc, p.id).await
    {
        let _ = tokio::time::timeout(
            AHEAD_WAIT,
            ctx.registry
                .with_owner(doc, |h| async move { h.wait_applied(p.id).await }),
        )
        .await;
    }
}

/// A long-poll answer.
pub struct PollAnswer {
    /// Everything after the asked position, merged into one update; `None`: nothing new
    /// within the wait.
    pub update: Option<Vec<u8>>,
    /// Where the answer brings the reader (the asked position when nothing was new).
    pub position: Option<Position>,
    /// The update is the whole document, not the entries after `after` (no position given,
    /// or it was trimmed or from another epoch).
    pub full: bool,
    /// The poll was cut short and answers nothing: its token was revoked (or expired), or the
    /// document failed under it.
    pub ended: Option<CloseCode>,
}

/// Long-poll: a subscriber that lives for one answer. Answers at once when anything follows
/// `after` (or with the full state when `after` cannot be replayed from); otherwise waits up
/// to `wait` for the next update.
///
/// Runs as a tracked task that holds the admission slot: if the client goes away, hyper drops
/// the request future, but the task still ends within `wait` and releases its subscription.
/// It is registered under `principal` like a socket, so a revocation ends it at once.
pub async fn long_poll(
    ctx: Arc<ConnContext>,
    slot: ConnectionSlot,
    doc: DocId,
    principal: Principal,
    after: Option<Position>,
    wait: Duration,
) -> Result<PollAnswer, DocError> {
    let tracker = ctx.tracker.clone();
    tracker
        .spawn(async move {
            let answer = poll_once(&ctx, &doc, principal, after, wait).await;
            drop(slot);
            answer
        })
        .await
        .map_err(|_| DocError::Unavailable)?
}

async fn poll_once(
    ctx: &Arc<ConnContext>,
    doc: &DocId,
    principal: Principal,
    after: Option<Position>,
    wait: Duration,
) -> Result<PollAnswer, DocError> {
    let deadline = Instant::now() + wait;
    if let Some(p) = after {
        settle_ahead(ctx, doc, p).await;
    }
    let outbox = ctx.new_outbox(&wires::NATIVE);
    let conn = outbox.conn;
    let from = SyncFrom {
        position: after,
        state_vector: None,
    };
    let handle = match ctx.registry.subscribe(doc, conn, &outbox, &from).await {
        Ok(h) => h,
        Err(e) => {
            outbox.close();
            ctx.forget_outbox(conn);
            return Err(e);
        }
    };
    ctx.set_holder(&outbox, principal, None);
    let mut gathered = Gathered::default();
    let ended = loop {
        let mut drained = outbox.drain();
        drained.request_owed(conn).await;
        gathered.take(&drained.frames);
        // A revoked poll answers nothing, whatever it gathered.
        if drained.close.is_some() {
            break drained.close;
        }
        // Only answer once the subscription's catch-up arrived: before it, the outbox may hold
        // live updates whose predecessors the catch-up has not delivered yet.
        if gathered.synced && !gathered.updates.is_empty() {
            break None;
        }
        // The catch-up always follows a subscription; the later bound only guards against a
        // document that went away meanwhile.
        let until = if gathered.synced {
            deadline
        } else {
            deadline.max(Instant::now()) + 5 * AHEAD_WAIT
        };
        tokio::select! {
            _ = outbox.ready() => {}
            _ = tokio::time::sleep_until(until) => break None,
            _ = ctx.shutdown.cancelled() => break None,
        }
    };
    handle.unsubscribe(conn).await;
    outbox.close();
    ctx.forget_outbox(conn);
    gathered.answer(after, ended)
}

/// What a long-poll drained so far, from its native frames.
#[derive(Default)]
struct Gathered {
    updates: Vec<Vec<u8>>,
    /// The subscription's catch-up arrived.
    synced: bool,
    /// A catch-up that was a state, not a replay: it holds everything before it.
    full: bool,
    position: Option<Position>,
}

impl Gathered {
    fn take(&mut self, frames: &[Bytes]) {
        for f in frames {
            match ServerFrame::decode(f) {
                Ok(ServerFrame::Synced {
                    update,
                    position,
                    replay,
                    ..
                }) => {
                    self.synced = true;
                    if !replay {
                        self.full = true;
                        self.updates.clear();
                    }
                    if !replay || update != yrs::Update::EMPTY_V1 {
                        self.updates.push(update);
                    }
                    self.position = Some(position);
                }
                Ok(ServerFrame::Update {
                    update, position, ..
                }) => {
                    self.updates.push(update);
                    self.position = Some(position);
                }
                _ => {}
            }
        }
    }

    /// The answer: nothing when the poll was ended or nothing new came (the asked position
    /// stands), else everything gathered merged into one update.
    fn answer(
        mut self,
        after: Option<Position>,
        ended: Option<CloseCode>,
    ) -> Result<PollAnswer, DocError> {
        let nothing = PollAnswer {
            update: None,
            position: after,
            full: false,
            ended,
        };
        if ended.is_some() {
            // A revoked poll still says where it got to, as it did before it was ended.
            return Ok(PollAnswer {
                position: self.position.or(after),
                full: self.full,
                ..nothing
            });
        }
        if !self.synced || self.updates.is_empty() {
            return Ok(nothing);
        }
        let update = match self.updates.len() {
            1 => self.updates.remove(0),
            _ => yrs::merge_updates_v1(self.updates.iter().map(Vec::as_slice))
                .map_err(|_| DocError::Unavailable)?,
        };
        Ok(PollAnswer {
            update: Some(update),
            position: self.position,
            full: self.full,
            ended: None,
        })
    }
}
