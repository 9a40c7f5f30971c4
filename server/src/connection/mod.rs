//! One WebSocket connection (data-flow steps 1 and 6): a reader that turns frames into
//! document commands and appends, and — only while something is queued for the socket — a
//! writer that drains the connection's outbox into it and closes with a documented code.
//! Heartbeats and token deadlines are not the connection's: the node's [`sweep`] keeps them
//! for every connection at once.
//!
//! Reader and writer are separate tracked tasks so that a client that stops reading cannot
//! stop us from reading it (and the other way round); the protocol-specific part is a
//! [`Session`], which never touches the socket.

pub mod native;
pub mod socket;
pub mod sse;
pub mod sweep;
pub mod wires;
mod writer;
pub mod yjs;

use crate::auth::{Auth, Principal};
use crate::doc::admit::{Door, WriteLimits};
use crate::doc::outbox::{Outbox, OutboxLimits, OutboxStats};
use crate::doc::wire::Wire;
use crate::doc::{ConnId, DocHandle, Registry};
use crate::limits::{ConnectionSlot, TokenBucket};
use bytes::Bytes;
use chorus_protocol::CloseCode;
use futures_util::StreamExt;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use socket::{FrameReader, Got, Socket};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use sweep::{Liveness, Sweep, WarnFrame};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tungstenite::Message;
use writer::Writer;

/// What every connection needs from the node.
pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub config: Arc<crate::Config>,
    /// Cancelled when the node shuts down: connections close with 1001.
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub stats: Arc<OutboxStats>,
    pub auth: Arc<Auth>,
    /// The write door every update passes (see [`crate::doc::admit`]).
    pub door: Door,
    /// HTTP writes answered before this node applied them (see `http::docs::post_update`).
    pub applied_late: AtomicU64,
    /// Open WebSocket connections (admission slots).
    pub open: Arc<AtomicUsize>,
    /// Connections whose writer task runs right now: something is queued for their socket
    /// (see `writer`; an idle connection has none).
    pub writers: AtomicUsize,
    /// Open TCP connections per client address (see `crate::serve`).
    pub per_ip: Arc<crate::serve::PerIp>,
    /// Document-API requests per client address (`--max-api-requests-per-second`).
    pub api_rate: crate::limits::PerIpRate,
    /// The node's flush tick (`--flush-interval`), which releases held writers.
    flush_clock: Option<Arc<FlushClock>>,
    /// Who holds each open connection, so revocations can find their sockets.
    holders: Mutex<HashMap<ConnId, (Principal, Weak<Outbox>)>>,
    accept_rate: Mutex<TokenBucket>,
    outboxes: Mutex<HashMap<ConnId, Weak<Outbox>>>,
    next_conn: AtomicU64,
    /// Pings, keepalives, silence checks and token deadlines for every open connection.
    sweep: Arc<Sweep>,
    /// Work that decodes a whole document off its owner (JSON, the inspector, a version
    /// restore): at most this many at once, since each holds a decoded copy (about ten times
    /// the encoded size).
    pub decodes: Arc<tokio::sync::Semaphore>,
}

/// Whole-document decodes a node runs at once (see [`ConnContext::decodes`]).
pub const MAX_DECODES: usize = 2;

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refused {
    /// Over `--max-connections-per-second`; retry after this long.
    RateLimited(Duration),
    /// `--max-connections` are open.
    Full,
    /// The node is shutting down.
    ShuttingDown,
}

impl ConnContext {
    pub fn new(
        registry: Arc<Registry>,
        config: Arc<crate::Config>,
        auth: Arc<Auth>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let rate = config.max_connections_per_second;
        let per_ip = config.max_connections_per_ip;
        let api_rate = crate::limits::PerIpRate::new(
            config.max_api_requests_per_second,
            config.max_api_requests_per_second.saturating_mul(2),
        );
        let flush_clock = (!config.flush_interval.is_zero())
            .then(|| FlushClock::spawn(config.flush_interval, shutdown.clone(), &tracker));
        let limits = WriteLimits {
            max_update_bytes: config.max_update_bytes,
            max_document_bytes: config.max_document_bytes,
            missing_deps_wait: config.missing_deps_wait,
        };
        let door = Door::new(
            registry.node(),
            registry.backplane().clone(),
            auth.clone(),
            limits,
        );
        let sweep = Arc::new(Sweep::new(config.token_warning));
        sweep.spawn(&config, shutdown.clone(), &tracker);
        ConnContext {
            sweep,
            decodes: Arc::new(tokio::sync::Semaphore::new(MAX_DECODES)),
            flush_clock,
            registry,
            config,
            shutdown,
            tracker,
            stats: Arc::new(OutboxStats::default()),
            auth,
            door,
            applied_late: AtomicU64::new(0),
            holders: Mutex::new(HashMap::new()),
            open: Arc::new(AtomicUsize::new(0)),
            writers: AtomicUsize::new(0),
            per_ip: Arc::new(crate::serve::PerIp::new(per_ip)),
            api_rate,
            accept_rate: Mutex::new(TokenBucket::new(rate, rate)),
            outboxes: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    /// Admission control for a WebSocket upgrade: a slot under `--max-connections` and a token
    /// from the connection-rate bucket.
    pub fn admit(&self) -> Result<ConnectionSlot, Refused> {
        if self.shutdown.is_cancelled() {
            return Err(Refused::ShuttingDown);
        }
        let slot = ConnectionSlot::acquire(&self.open, self.config.max_connections)
            .ok_or(Refused::Full)?;
        let mut bucket = self.accept_rate.lock().unwrap_or_else(|p| p.into_inner());
        if !bucket.try_take() {
            return Err(Refused::RateLimited(bucket.wait_time()));
        }
        Ok(slot)
    }

    /// A new outbox for a connection, registered for stats until the connection ends.
    pub fn new_outbox(&self, wire: &'static dyn Wire) -> Arc<Outbox> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let limits = OutboxLimits {
            budget: self.config.outbox_bytes,
            awareness_interval: Duration::from_secs_f64(
                1.0 / f64::from(self.config.awareness_hz.max(1)),
            ),
        };
        let outbox = Arc::new(Outbox::new(conn, wire, limits, self.stats.clone()));
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn, Arc::downgrade(&outbox));
        outbox
    }

    pub(crate) fn forget_outbox(&self, conn: ConnId) {
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
        self.sweep.forget(conn);
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn);
    }

    /// Records (or, after a refresh, replaces) who holds a connection, and files its token's
    /// expiry with the sweep: `warn` is how the connection's protocol says the token expires
    /// soon (`None`: it has no way to). A revocation applied after the token was verified but
    /// before this registration found nothing to close, so the token is checked again once
    /// registered (`revoke` records before it looks here): every revocation is seen by one of
    /// the two.
    pub fn set_holder(&self, outbox: &Arc<Outbox>, principal: Principal, warn: Option<WarnFrame>) {
        self.sweep.schedule_expiry(outbox, principal.exp, warn);
        let check = principal.clone();
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(outbox.conn, (principal, Arc::downgrade(outbox)));
        if let Err(e) = self.auth.still_valid(&check) {
            outbox.request_close(e.close_code());
        }
    }

    /// Applies a revocation (made here or published by another node) and closes every socket
    /// it covers on this node with 4103; returns how many were closed.
    pub fn revoke(&self, rev: &crate::backplane::Revocation) -> usize {
        self.auth
            .revoke(rev.sub.as_deref(), rev.jti.as_deref(), rev.exp, rev.at);
        let hit: Vec<Arc<Outbox>> = self
            .holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(p, _)| self.auth.is_revoked(p))
            .filter_map(|(_, o)| o.upgrade())
            .collect();
        for outbox in &hit {
            outbox.request_close(CloseCode::Revoked);
        }
        hit.len()
    }

    /// Keeps a one-way stream alive from the node's sweep: `keepalive` (in the stream's own
    /// framing) goes into its outbox every ping interval, until [`ConnContext::forget_outbox`].
    pub fn keep_alive(&self, outbox: &Arc<Outbox>, keepalive: &'static Bytes) {
        self.sweep.watch(outbox, Liveness::Stream(keepalive));
    }

    /// (total, largest) bytes waiting in connection outboxes right now.
    pub fn outbox_bytes(&self) -> (usize, usize) {
        let outboxes: Vec<Arc<Outbox>> = self
            .outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        outboxes
            .iter()
            .map(|o| o.pending_bytes())
            .fold((0, 0), |(t, m), b| (t + b, m.max(b)))
    }
}

/// What a session wants done after handling a frame.
pub enum Step {
    Continue,
    Close(CloseCode),
}

/// The protocol half of a connection: bytes in, document commands and outbox frames out.
pub trait Session: Send + 'static {
    /// Handles one binary message.
    fn on_binary(&mut self, bytes: Bytes) -> impl std::future::Future<Output = Step> + Send;
    /// The client sent faster than `--max-messages-per-second`. `None`: wait for a token
    /// (backpressure) and process the message; `Some`: the message was refused.
    fn on_rate_limited(&mut self) -> Option<Step>;
    /// Appends in flight (polled by the reader; results may produce error frames).
    fn inflight(&mut self) -> &mut FuturesUnordered<native::AppendFuture>;
    /// Called with each finished append.
    fn on_appended(&mut self, done: native::AppendDone) -> Step;
    /// Documents this connection holds, to release when it ends.
    fn documents(&mut self) -> Vec<DocHandle>;
    /// Updates the session holds back, while the socket keeps being read, until what they
    /// build on arrives: when to look at them again. `None` while nothing is held.
    fn held(&self) -> Option<HeldWake> {
        None
    }
    /// The document learned more, or the oldest held update's wait ended.
    fn on_held_wake(&mut self) -> Step {
        Step::Continue
    }
}

/// When a session's held updates are due for another look (see [`Session::held`]).
pub struct HeldWake {
    /// Changes when the document learns of more applied state.
    pub changed: tokio::sync::watch::Receiver<u64>,
    /// The oldest held update's wait ends.
    pub until: Instant,
}

impl HeldWake {
    /// Boxed, and only while something is held: the reader's future keeps room for every
    /// future its `select!` waits on, and an idle connection should not carry this one's
    /// timer and watch for nothing.
    fn wait(held: Option<HeldWake>) -> impl Future<Output = ()> + Send {
        match held {
            Some(h) => Either::Left(Box::pin(h.until_due())),
            None => Either::Right(std::future::pending()),
        }
    }

    async fn until_due(mut self) {
        let until = self.until;
        tokio::select! {
            changed = self.changed.changed() => {
                // The document is gone: only the deadline is left to wait for.
                if changed.is_err() {
                    tokio::time::sleep_until(until).await;
                }
            }
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// `make()`'s future, boxed, if `now`; otherwise one that never resolves. For waits that only
/// happen now and then: an idle connection's future does not keep room for them.
fn when<F: Future<Output = ()> + Send>(
    now: bool,
    make: impl FnOnce() -> F,
) -> impl Future<Output = ()> + Send {
    match now {
        true => Either::Left(Box::pin(make())),
        false => Either::Right(std::future::pending()),
    }
}

/// Appends one connection may have in flight before we stop reading its frames.
pub const MAX_INFLIGHT: usize = 256;

/// tungstenite reads into a buffer of this size per connection (it zero-fills it, so all of
/// it is resident). 1 KiB holds a keystroke update or a cursor move in one read; larger
/// messages still arrive, 1 KiB per read (the buffer grows to hold the message). Measured
/// with 5,000 idle y-websocket clients: 2 KiB buffers 9.1 KB per connection, 1 KiB 8.1 KB.
const READ_BUFFER: usize = 1024;

/// An upgraded WebSocket: its TCP stream and what the HTTP layer read past the request.
pub struct Upgraded {
    pub socket: Arc<Socket>,
    pub read_buf: Bytes,
}

/// Runs a connection to the end: spawns its writer, reads until either side is done, then
/// releases everything it held.
///
/// An idle connection's memory is mostly its two task futures, so they are kept small: the
/// session and reader are boxed before the async body starts (a future keeps room for its
/// arguments for its whole life, beside the locals they are moved into), and awaits that only
/// run now and then (handling a frame, a resync) are boxed while they run.
pub fn run<S: Session>(
    upgraded: Upgraded,
    ctx: Arc<ConnContext>,
    slot: ConnectionSlot,
    outbox: Arc<Outbox>,
    session: S,
) -> impl std::future::Future<Output = ()> + Send {
    let reader = Box::new(FrameReader::new(
        upgraded.read_buf,
        READ_BUFFER,
        ctx.config.max_message_bytes,
    ));
    run_boxed(
        upgraded.socket,
        reader,
        ctx,
        slot,
        outbox,
        Box::new(session),
    )
}

async fn run_boxed<S: Session>(
    socket: Arc<Socket>,
    mut reader: Box<FrameReader>,
    ctx: Arc<ConnContext>,
    slot: ConnectionSlot,
    outbox: Arc<Outbox>,
    mut session: Box<S>,
) {
    let conn = outbox.conn;
    if ctx.flush_clock.is_none() {
        // With `--flush-interval` every write waits for the tick on purpose.
        outbox.attach_socket(socket.clone());
    }
    let rate = ctx.config.max_messages_per_second;
    let mut messages = TokenBucket::new(rate, rate.saturating_mul(2));
    let live = ctx.sweep.watch(&outbox, Liveness::Socket);
    // Started when something is queued, not before (see `writer`).
    let mut writer = Writer::new(socket.clone(), outbox.clone(), ctx.clone());

    let reason = loop {
        if writer.finished() {
            break "writer finished";
        }
        let inflight_full = session.inflight().len() >= MAX_INFLIGHT;
        // Backpressure on the client's own requests: while more waits for it than its budget
        // (an answer to a document larger than the budget, say), what it sends stays unread
        // in the socket, so asking again and again without reading costs nothing here.
        let over_budget = outbox.over_budget();
        let held = session.held();
        let (may_start, writing) = (writer.may_start(), writer.running());
        tokio::select! {
            biased;
            _ = writer.joined(), if writing => {}
            _ = outbox.ready(), if may_start => writer.start(),
            // The writer says "going away" (after flushing what waits).
            _ = ctx.shutdown.cancelled(), if may_start => writer.start(),
            Some(appended) = session.inflight().next() => {
                if let Step::Close(code) = session.on_appended(appended) {
                    outbox.request_close(code);
                }
            }
            _ = when(over_budget, || outbox.room()) => {}
            _ = HeldWake::wait(held) => {
                if let Step::Close(code) = session.on_held_wake() {
                    outbox.request_close(code);
                }
            }
            // Once a close is asked for (revoked, expired, misbehaving) nothing more the
            // client sends is acted on, even while the writer is still stuck on a slow peer.
            got = next_message(&mut reader, &socket), if !inflight_full && !over_budget && !outbox.close_requested() => {
                ctx.sweep.seen(&live);
                if let Some(replies) = reader.take_replies() {
                    outbox.push_raw(replies);
                }
                let handled = on_message(got, &mut *session, &mut messages, &mut writer, &outbox);
                if let Some(reason) = Box::pin(handled).await {
                    break reason;
                }
            }
        }
    };
    tracing::debug!(conn, reason, "connection reader finished");
    Box::pin(writer.end()).await;
    for handle in session.documents() {
        handle.unsubscribe(conn).await;
    }
    outbox.close();
    ctx.forget_outbox(conn);
    linger(&mut reader, &socket).await;
    drop(slot);
}

/// Acts on one message from the client; `Some(reason)` ends the connection.
async fn on_message<S: Session>(
    got: Got,
    session: &mut S,
    messages: &mut TokenBucket,
    writer: &mut Writer,
    outbox: &Outbox,
) -> Option<&'static str> {
    match got {
        Got::Closed => Some("client went away"),
        Got::Message(Message::Binary(bytes)) => {
            let handling = on_binary(session, messages, bytes);
            if let Step::Close(code) = writer.alongside(handling).await {
                outbox.request_close(code);
            }
            None
        }
        Got::Message(Message::Text(_)) => {
            outbox.request_close(CloseCode::UnsupportedData);
            None
        }
        Got::Message(Message::Close(_)) => Some("client closed"),
        Got::Message(_) | Got::WouldBlock => None,
        Got::Error(tungstenite::Error::Capacity(_)) => {
            outbox.request_close(CloseCode::MessageTooBig);
            // Give the writer its chance to send the close frame.
            let closing = async {
                while !writer.finished() {
                    writer.start();
                    writer.joined().await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
            Some("message too big")
        }
        Got::Error(_) => Some("read error"),
    }
}

/// The next message from the client (tungstenite keeps frames it already read, so it is asked
/// before the socket is waited on).
async fn next_message(reader: &mut FrameReader, socket: &Socket) -> Got {
    loop {
        match reader.read(&socket.tcp) {
            Got::WouldBlock => {
                if socket.tcp.readable().await.is_err() {
                    return Got::Closed;
                }
            }
            got => return got,
        }
    }
}

/// Hands one binary message to the session, under `--max-messages-per-second`.
async fn on_binary<S: Session>(session: &mut S, messages: &mut TokenBucket, bytes: Bytes) -> Step {
    let hot = crate::metrics::hot();
    hot.frames_in.increment(1);
    hot.bytes_in.increment(bytes.len() as u64);
    if messages.try_take() {
        return session.on_binary(bytes).await;
    }
    match session.on_rate_limited() {
        Some(step) => step,
        None => {
            tokio::time::sleep(messages.wait_time()).await;
            let _ = messages.try_take();
            session.on_binary(bytes).await
        }
    }
}

/// After our close frame: reads (and drops) what the client still sends until it closes too,
/// for at most a second. Closing a socket with unread data in it sends a reset, which can
/// destroy the close frame before the client reads it.
async fn linger(reader: &mut FrameReader, socket: &Socket) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Got::Message(_) | Got::WouldBlock = next_message(reader, socket).await {}
    })
    .await;
}

/// The node's flush tick for `--flush-interval`. A writer that wrote updates is held: pushes
/// don't wake it until the next tick, which releases every held writer at once. One timer for
/// the node rather than one per write: per-writer timers fall due at scattered instants, each
/// a wake-up of its own (BENCHMARKS.md has the A/B).
struct FlushClock {
    held: Mutex<Vec<Arc<Outbox>>>,
}

impl FlushClock {
    fn spawn(interval: Duration, shutdown: CancellationToken, tracker: &TaskTracker) -> Arc<Self> {
        let clock = Arc::new(FlushClock {
            held: Mutex::new(Vec::new()),
        });
        let ticking = clock.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            // Swapped with the held list each tick, so neither allocates once grown.
            let mut due = Vec::new();
            loop {
                tokio::select! {
                    // Writers hear the shutdown themselves and drain.
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                std::mem::swap(&mut *ticking.lock(), &mut due);
                for outbox in due.drain(..) {
                    outbox.release();
                }
            }
        });
        clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Outbox>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `outbox`'s writer until the next tick. At most one entry per connection, so the
    /// list is bounded by the open connections.
    fn hold(&self, outbox: &Arc<Outbox>) {
        if outbox.hold() {
            self.lock().push(outbox.clone());
        }
    }
}

/// Sleeps until `at`; never resolves for `None`. The timer is boxed and made only when there is
/// one: a writer waits here for its whole life, nearly always with nothing to wait for.
fn sleep_until_opt(at: Option<Instant>) -> impl Future<Output = ()> + Send {
    match at {
        Some(at) => Either::Left(Box::pin(tokio::time::sleep_until(at))),
        None => Either::Right(std::future::pending()),
    }
}
