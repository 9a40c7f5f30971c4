//! The connection's writer (data-flow step 6, the slow path): drains what the outbox queued
//! into the socket when a direct write could not take it, and writes the close.
//!
//! The writer is a task that runs only while something is queued. Most frames never queue:
//! the document's owner writes them to the socket directly (see `doc::outbox`), so an idle
//! connection — and most busy ones — has no writer at all, and carries no task, future or
//! cancellation token for one. When something queues (a short write, a full socket, a close,
//! `--flush-interval`'s batching), the outbox tells the connection, and the connection's
//! reader starts a writer, which drains until the queue is empty and ends. The reader keeps
//! watching for new work while it handles a frame (a document load, a dependency wait), so
//! queued frames never wait behind a slow request ([`Writer::alongside`]).
//!
//! A wake is never lost: a push that queues while a writer is finishing leaves a permit in
//! the outbox's notifier, which starts the next writer at once.

use super::socket::{self, Socket, Wrote};
use super::{ConnContext, sleep_until_opt};
use crate::doc::outbox::Outbox;
use bytes::Bytes;
use chorus_protocol::CloseCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How one writer run ended.
enum Ended {
    /// The queue is empty: the connection goes on, and the next queued frame starts a writer.
    Idle,
    /// The write side is done: closed with a code, the socket failed, or the reader ended.
    Finished,
}

/// The connection's writer, as its reader sees it: none, one running, or finished for good.
pub(super) struct Writer {
    socket: Arc<Socket>,
    outbox: Arc<Outbox>,
    ctx: Arc<ConnContext>,
    running: Option<Running>,
    finished: bool,
}

struct Running {
    task: JoinHandle<Ended>,
    /// Cancelled when the reader ends: the writer writes what the client is owed and stops.
    stop: CancellationToken,
}

impl Writer {
    pub(super) fn new(socket: Arc<Socket>, outbox: Arc<Outbox>, ctx: Arc<ConnContext>) -> Self {
        Writer {
            socket,
            outbox,
            ctx,
            running: None,
            finished: false,
        }
    }

    /// The write side finished (a close went out, or the socket broke): the connection ends.
    pub(super) fn finished(&self) -> bool {
        self.finished
    }

    pub(super) fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether a new writer may start (none runs, and the write side is not finished).
    pub(super) fn may_start(&self) -> bool {
        self.running.is_none() && !self.finished
    }

    /// Starts a writer (the outbox has something queued, or the node is shutting down).
    pub(super) fn start(&mut self) {
        if !self.may_start() {
            return;
        }
        let stop = CancellationToken::new();
        let counted = Counted::new(self.ctx.clone());
        let run = write_loop(
            self.socket.clone(),
            self.outbox.clone(),
            self.ctx.clone(),
            stop.clone(),
        );
        let task = self.ctx.tracker.spawn(async move {
            let _counted = counted;
            run.await
        });
        self.running = Some(Running { task, stop });
    }

    /// Resolves when the running writer ends (never, while none runs).
    pub(super) async fn joined(&mut self) {
        let Some(running) = &mut self.running else {
            return std::future::pending().await;
        };
        let ended = (&mut running.task).await;
        self.running = None;
        if !matches!(ended, Ok(Ended::Idle)) {
            self.finished = true;
        }
    }

    /// Runs `work` (the reader handling one frame) while still starting and joining writers,
    /// so that what queues meanwhile is written meanwhile.
    pub(super) async fn alongside<T>(&mut self, work: impl Future<Output = T>) -> T {
        let shutdown = self.ctx.shutdown.clone();
        let outbox = self.outbox.clone();
        tokio::pin!(work);
        loop {
            let (may_start, running) = (self.may_start(), self.running());
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = self.joined(), if running => {}
                _ = outbox.ready(), if may_start => self.start(),
                _ = shutdown.cancelled(), if may_start => self.start(),
            }
        }
    }

    /// The reader ended: a running writer writes what the client is owed and stops; without
    /// one, that is written here. Either way the socket's write side is closed after.
    pub(super) async fn end(mut self) {
        if let Some(running) = self.running.take() {
            running.stop.cancel();
            let _ = running.task.await;
            return;
        }
        if self.finished {
            return;
        }
        owed(&self.socket, &self.outbox).await;
        finish(&self.socket, None).await;
    }
}

/// Counts a running writer in `ConnContext::writers` for as long as it lives.
struct Counted(Arc<ConnContext>);

impl Counted {
    fn new(ctx: Arc<ConnContext>) -> Self {
        ctx.writers.fetch_add(1, Ordering::Relaxed);
        Counted(ctx)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What tungstenite owes the client (the reply to its close) and the rest of a short write.
async fn owed(socket: &Socket, outbox: &Outbox) {
    let raw = outbox.take_raw();
    if !raw.is_empty() {
        let _ = Box::pin(socket.write_all(raw, Duration::from_secs(1))).await;
    }
}

/// Counts how the connection closed, sends the close frame if there is one, and closes the
/// socket's write side.
async fn finish(socket: &Socket, close: Option<CloseCode>) {
    let code_label = close.map_or_else(|| "none".to_owned(), |c| c.code().to_string());
    metrics::counter!(crate::metrics::names::CLOSES, "code" => code_label).increment(1);
    if let Some(code) = close {
        let frame = vec![socket::close_frame(code)];
        let _ = Box::pin(socket.write_all(frame, Duration::from_secs(1))).await;
    }
    socket.shutdown_write();
}

/// One writer run: drains and writes until the queue is empty (then [`Ended::Idle`]), or
/// until the connection's write side is done.
async fn write_loop(
    socket: Arc<Socket>,
    outbox: Arc<Outbox>,
    ctx: Arc<ConnContext>,
    stop: CancellationToken,
) -> Ended {
    let mut wake_at: Option<Instant> = None;
    // The wake that started this writer was taken by the reader: drain at once.
    let mut started = true;
    let close = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                owed(&socket, &outbox).await;
                break None;
            }
            _ = ctx.shutdown.cancelled() => {
                // Drain: flush what is already waiting (bounded), then say "going away".
                let drained = outbox.drain();
                let runs = socket::frame_all(drained.raw, drained.frames);
                let _ = Box::pin(socket.write_runs(runs, Duration::from_secs(2), Vec::new)).await;
                outbox.finish_write();
                break Some(CloseCode::GoingAway);
            }
            _ = std::future::ready(()), if started => {}
            _ = outbox.ready() => {}
            _ = sleep_until_opt(wake_at) => {}
        };
        started = false;
        let flushing = ctx.flush_clock.is_some();
        if flushing && outbox.is_held() && !outbox.urgent() {
            // Held for the flush tick, which drains everything (awareness held back by its
            // rate cap included); only a close or an error frame goes first.
            wake_at = None;
            continue;
        }
        let (wrote, close) = Box::pin(write_drained(&socket, &outbox, &ctx, &mut wake_at)).await;
        match wrote {
            Wrote::Ok if close.is_some() => break close,
            // Nothing left, and nothing to wait for (awareness held back by its rate cap, the
            // flush tick): a later push starts the next writer.
            Wrote::Ok if wake_at.is_none() && !(flushing && outbox.is_held()) => {
                return Ended::Idle;
            }
            Wrote::Ok => {}
            Wrote::Failed => break None,
            Wrote::Stalled(rest) => break Box::pin(on_stall(&socket, &outbox, &ctx, rest)).await,
        }
    };
    finish(&socket, close).await;
    Ended::Finished
}

/// One drain of the outbox into the socket; returns how the write went and the close the
/// drain asked for.
async fn write_drained(
    socket: &Socket,
    outbox: &Arc<Outbox>,
    ctx: &ConnContext,
    wake_at: &mut Option<Instant>,
) -> (Wrote, Option<CloseCode>) {
    let mut drained = outbox.drain();
    *wake_at = drained.wake_at;
    drained.request_owed(outbox.conn).await;
    let close = drained.close;
    if drained.raw.is_empty() && drained.frames.is_empty() {
        outbox.finish_write();
        return (Wrote::Ok, close);
    }
    if let Some(clock) = &ctx.flush_clock {
        // Before the write: a tick during it releases the writer at once.
        clock.hold(outbox);
    }
    let stats = &ctx.stats;
    stats.writes.fetch_add(1, Ordering::Relaxed);
    let n = drained.frames.len() as u64;
    stats.frames_written.fetch_add(n, Ordering::Relaxed);
    let hot = crate::metrics::hot();
    hot.frames_out.increment(n);
    hot.bytes_out
        .increment(drained.frames.iter().map(|f| f.len() as u64).sum());
    let runs = socket::frame_all(drained.raw, drained.frames);
    // Pings and pongs that come up while a long answer is written go between its fragments.
    let controls = || outbox.take_raw_while(socket::is_ping_or_pong);
    let wrote = socket
        .write_runs(runs, ctx.config.slow_client_timeout, controls)
        .await;
    outbox.finish_write();
    (wrote, close)
}

/// The peer stopped reading. Give it one more period to take what is already in flight, so
/// that if it comes back it reads a clean close telling it to resume; otherwise drop it (it
/// resumes by position all the same).
async fn on_stall(
    socket: &Socket,
    outbox: &Outbox,
    ctx: &ConnContext,
    rest: Vec<Bytes>,
) -> Option<CloseCode> {
    tracing::info!(
        conn = outbox.conn,
        "peer stopped reading; closing as too slow"
    );
    ctx.stats.stalled.fetch_add(1, Ordering::Relaxed);
    let flushed = socket.write_all(rest, ctx.config.slow_client_timeout).await;
    ctx.stats.stalled.fetch_sub(1, Ordering::Relaxed);
    ctx.stats.slow_closes.fetch_add(1, Ordering::Relaxed);
    match flushed {
        Wrote::Ok => Some(CloseCode::TooSlow),
        _ => None,
    }
}
