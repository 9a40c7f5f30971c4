//! One-way HTTP readers (data-flow step 6 without a socket): Server-Sent Events and long-poll.
//!
//! Neither is a fork of the WebSocket path. Both subscribe through the same
//! [`Registry`](crate::doc::Registry) call and drain the same coalescing [`Outbox`] (in the
//! native encoding) a WebSocket connection does, so replay, merging of slow readers, the byte
//! budget and the catch-up `synced` behave identically; this module only turns drained native
//! frames into SSE events or into one long-poll answer.
//!
//! Data on the wire: every document payload is a base64 yrs v1 update; every position is the
//! text form `epoch.ms-seq`, which is the SSE event `id:` and what `Last-Event-ID` or `after`
//! bring back.

use super::ConnContext;
use crate::auth::Principal;
use crate::doc::outbox::{Outbox, Proto};
use crate::doc::{DocError, DocHandle, SyncFrom};
use crate::limits::ConnectionSlot;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
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
        let outbox = ctx.new_outbox(Proto::Native);
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
                // Drain: what is waiting goes out (bounded), then "going away"; the browser
                // reconnects (to another node, through the balancer) with Last-Event-ID.
                let drained = outbox.drain();
                let mut chunk = events(&drained.frames, req.presence);
                chunk.extend_from_slice(&close_event(CloseCode::GoingAway));
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), tx.send(Bytes::from(chunk))).await;
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
                let mut chunk = drained.raw.concat();
                chunk.extend_from_slice(&events(&drained.frames, req.presence));
                if !chunk.is_empty() {
                    ok = send(Bytes::from(chunk)).await;
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

/// Drained native frames as SSE text. A catch-up that is not an exact replay (first state,
/// trimmed or foreign position, catch-up after the budget was exceeded) is `event: state`;
/// replays and updates are plain `message` events; presence is `event: awareness` (no id).
fn events(frames: &[Bytes], presence: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let Ok(frame) = ServerFrame::decode(f) else {
            continue;
        };
        match frame {
            ServerFrame::Synced {
                update,
                position,
                replay,
                ..
            } => {
                if replay && update == yrs::Update::EMPTY_V1 {
                    continue; // the reader already is at `position`
                }
                let name = if replay { None } else { Some("state") };
                event(&mut out, name, Some(position), &update);
            }
            ServerFrame::Update {
                update, position, ..
            } => event(&mut out, None, Some(position), &update),
            ServerFrame::Awareness { update, .. } if presence => {
                event(&mut out, Some("awareness"), None, &update)
            }
            _ => {}
        }
    }
    out
}

fn event(out: &mut Vec<u8>, name: Option<&str>, id: Option<Position>, data: &[u8]) {
    use std::io::Write;
    if let Some(name) = name {
        let _ = writeln!(out, "event: {name}");
    }
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    let _ = writeln!(out, "data: {}\n", B64.encode(data));
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
    let outbox = ctx.new_outbox(Proto::Native);
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
    let mut answer = PollAnswer {
        update: None,
        position: after,
        full: false,
        ended: None,
    };
    let mut updates: Vec<Vec<u8>> = Vec::new();
    let mut synced = false;
    loop {
        let mut drained = outbox.drain();
        drained.request_owed(conn).await;
        for f in &drained.frames {
            match ServerFrame::decode(f) {
                Ok(ServerFrame::Synced {
                    update,
                    position,
                    replay,
                    ..
                }) => {
                    synced = true;
                    if !replay {
                        // Whole state (or a catch-up after shedding): it contains everything.
                        answer.full = true;
                        updates.clear();
                    }
                    if !replay || update != yrs::Update::EMPTY_V1 {
                        updates.push(update);
                    }
                    answer.position = Some(position);
                }
                Ok(ServerFrame::Update {
                    update, position, ..
                }) => {
                    updates.push(update);
                    answer.position = Some(position);
                }
                _ => {}
            }
        }
        // A revoked poll answers nothing, whatever it gathered.
        if drained.close.is_some() {
            answer.ended = drained.close;
            break;
        }
        // Only answer once the subscription's catch-up arrived: before it, the outbox may hold
        // live updates whose predecessors the catch-up has not delivered yet.
        if synced && !updates.is_empty() {
            break;
        }
        // The catch-up always follows a subscription; the later bound only guards against a
        // document that went away meanwhile.
        let until = if synced {
            deadline
        } else {
            deadline.max(Instant::now()) + 5 * AHEAD_WAIT
        };
        tokio::select! {
            _ = outbox.ready() => {}
            _ = tokio::time::sleep_until(until) => break,
            _ = ctx.shutdown.cancelled() => break,
        }
    }
    handle.unsubscribe(conn).await;
    outbox.close();
    ctx.forget_outbox(conn);
    if answer.ended.is_some() {
        answer.update = None;
        return Ok(answer);
    }
    if !synced || updates.is_empty() {
        answer.position = after;
        answer.full = false;
        return Ok(answer);
    }
    answer.update = Some(match updates.len() {
        1 => updates.remove(0),
        _ => yrs::merge_updates_v1(updates.iter().map(Vec::as_slice))
            .map_err(|_| DocError::Unavailable)?,
    });
    Ok(answer)
}
