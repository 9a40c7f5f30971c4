//! One WebSocket connection (data-flow steps 1 and 6): a reader that turns frames into
//! document commands and appends, and a writer that drains the connection's outbox into the
//! socket, sends heartbeats and closes with a documented code.
//!
//! Reader and writer are separate tracked tasks so that a client that stops reading cannot
//! stop us from reading it (and the other way round); the protocol-specific part is a
//! [`Session`], which never touches the socket.

pub mod native;
pub mod yjs;

use crate::doc::outbox::{Outbox, Proto};
use crate::doc::{ConnId, DocHandle, Registry};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use chorus_protocol::CloseCode;
use futures_util::stream::{FuturesUnordered, SplitSink};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every connection needs from the node.
pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub config: Arc<crate::Config>,
    /// Cancelled when the node shuts down: connections close with 1001.
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    next_conn: AtomicU64,
    pub open: AtomicUsize,
}

impl ConnContext {
    pub fn new(
        registry: Arc<Registry>,
        config: Arc<crate::Config>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        ConnContext {
            registry,
            config,
            shutdown,
            tracker,
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
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
    /// Appends in flight (polled by the reader; results may produce error frames).
    fn inflight(&mut self) -> &mut FuturesUnordered<native::AppendFuture>;
    /// Called with each finished append.
    fn on_appended(&mut self, done: native::AppendDone) -> Step;
    /// Documents this connection holds, to release when it ends.
    fn documents(&mut self) -> Vec<DocHandle>;
}

/// Appends one connection may have in flight before we stop reading its frames.
pub const MAX_INFLIGHT: usize = 256;

/// Runs a connection to the end: spawns its writer, reads until either side is done, then
/// releases everything it held.
pub async fn run<S: Session>(
    socket: WebSocket,
    ctx: Arc<ConnContext>,
    outbox: Arc<Outbox>,
    mut session: S,
) {
    ctx.open.fetch_add(1, Ordering::Relaxed);
    let conn = outbox.conn;
    let done = CancellationToken::new();
    let last_seen = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (sink, mut stream) = socket.split();

    let writer = ctx.tracker.spawn(write_loop(
        sink,
        outbox.clone(),
        ctx.clone(),
        done.clone(),
        last_seen.clone(),
        started,
    ));

    let reason = loop {
        let inflight_full = session.inflight().len() >= MAX_INFLIGHT;
        tokio::select! {
            biased;
            _ = done.cancelled() => break "writer finished",
            Some(appended) = session.inflight().next() => {
                if let Step::Close(code) = session.on_appended(appended) {
                    outbox.request_close(code);
                }
            }
            msg = stream.next(), if !inflight_full => {
                last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                match msg {
                    None => break "client went away",
                    Some(Ok(Message::Binary(bytes))) => {
                        if let Step::Close(code) = session.on_binary(bytes).await {
                            outbox.request_close(code);
                        }
                    }
                    Some(Ok(Message::Text(_))) => outbox.request_close(CloseCode::UnsupportedData),
                    Some(Ok(Message::Close(_))) => break "client closed",
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Err(e)) => {
                        if is_too_big(e) {
                            outbox.request_close(CloseCode::MessageTooBig);
                            // Give the writer its chance to send the close frame.
                            tokio::select! {
                                _ = done.cancelled() => {}
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                            break "message too big";
                        }
                        break "read error";
                    }
                }
            }
        }
    };
    tracing::debug!(conn, reason, "connection reader finished");
    done.cancel();
    let _ = writer.await;
    for handle in session.documents() {
        handle.unsubscribe(conn).await;
    }
    outbox.close();
    ctx.open.fetch_sub(1, Ordering::Relaxed);
}

fn is_too_big(e: axum::Error) -> bool {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => matches!(*e, tungstenite::Error::Capacity(_)),
        Err(_) => false,
    }
}

/// An empty awareness update: y-websocket clients drop a socket after 30 s without any
/// message (WebSocket pings never reach their JavaScript), so quiet y-websocket sockets get
/// this harmless message every 15 s.
const YJS_KEEPALIVE: &[u8] = &[1, 1, 0];
const YJS_KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    ctx: Arc<ConnContext>,
    done: CancellationToken,
    last_seen: Arc<AtomicU64>,
    started: Instant,
) {
    let cfg = &ctx.config;
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    let mut keepalive = tokio::time::interval(YJS_KEEPALIVE_EVERY);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    keepalive.tick().await;
    let mut last_write = Instant::now();
    // A write that cannot finish within a whole heartbeat period means the peer is not
    // reading at all; it is closed as too slow (and resumes by position when it returns).
    let write_deadline = cfg.ping_interval + cfg.ping_timeout;
    let silence_limit = (cfg.ping_interval + cfg.ping_timeout).as_millis() as u64;

    let close = loop {
        tokio::select! {
            biased;
            _ = done.cancelled() => break None,
            _ = ctx.shutdown.cancelled() => {
                // Drain: flush what is already waiting (bounded), then say "going away".
                let drained = outbox.drain();
                let _ = tokio::time::timeout(Duration::from_secs(2), send_all(&mut sink, drained.frames)).await;
                break Some(CloseCode::GoingAway);
            }
            _ = outbox.ready() => {
                let drained = outbox.drain();
                for (handle, from) in drained.resync {
                    handle.resync(outbox.conn, from).await;
                }
                if !drained.frames.is_empty() {
                    match tokio::time::timeout(write_deadline, send_all(&mut sink, drained.frames)).await {
                        Ok(Ok(())) => last_write = Instant::now(),
                        Ok(Err(_)) => break None,
                        Err(_) => {
                            tracing::info!(conn = outbox.conn, "peer stopped reading; closing as too slow");
                            break None;
                        }
                    }
                }
                if let Some(code) = drained.close {
                    break Some(code);
                }
            }
            _ = ping.tick() => {
                let seen = last_seen.load(Ordering::Relaxed);
                if (started.elapsed().as_millis() as u64).saturating_sub(seen) > silence_limit {
                    tracing::info!(conn = outbox.conn, "no frame or pong within the heartbeat timeout; closing");
                    break Some(CloseCode::HeartbeatTimeout);
                }
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
            _ = keepalive.tick(), if outbox.proto == Proto::Yjs => {
                if last_write.elapsed() >= YJS_KEEPALIVE_EVERY {
                    if sink.send(Message::Binary(Bytes::from_static(YJS_KEEPALIVE))).await.is_err() {
                        break None;
                    }
                    last_write = Instant::now();
                }
            }
        }
    };
    if let Some(code) = close {
        let frame = CloseFrame {
            code: code.code(),
            reason: code.reason().into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    done.cancel();
}

async fn send_all(
    sink: &mut SplitSink<WebSocket, Message>,
    frames: Vec<Bytes>,
) -> Result<(), axum::Error> {
    // feed() queues into tungstenite's write buffer; one flush writes many frames per syscall.
    for f in frames {
        sink.feed(Message::Binary(f)).await?;
    }
    sink.flush().await
}
