//! The node-wide sweep (data-flow steps 1 and 6, for every connection at once): pings,
//! y-websocket and SSE keepalives and the silence check, token-expiry warnings and expiry
//! closes, from one task and at most two timers for the whole node.
//!
//! Why one sweep rather than timers in each connection: a timer per connection is a timer
//! entry, a task wake per period, and room in the connection's task future for the `Sleep` —
//! memory every idle connection carries whether or not it ever fires. Here a connection is an
//! entry in a map, and it does something only when it is due: pings go out to every socket in
//! one pass per ping interval; token deadlines sit in one ordered schedule, and the task sleeps
//! until the earliest of them (so expiry stays precise to the millisecond).
//!
//! What a sweep entry does to a connection goes through its outbox, as everything else that
//! reaches a socket does: a ping (or an SSE comment line) is raw framed bytes, a y-websocket
//! keepalive or a warning a control frame, an expiry a close request (4101). The session keeps owning its protocol: it registers how
//! its wire says "your token expires at X" ([`WarnFrame`]), or nothing if the wire has no such
//! message, and the sweep encodes it only when the warning is due.
//!
//! Timers that stay with a connection, and why they are fine: each runs only while something
//! is happening on that connection, never while it idles.
//! - The writer's stall timeout (`Socket::write_all`) exists only while a write waits for a
//!   socket that is full; the awareness rate cap's wake (`Drained::wake_at`) only while an
//!   awareness frame is held back by it.
//! - The message-rate sleep (`on_binary`) runs only while a client sends faster than its rate.
//! - A held update's deadline (`HeldWake`) runs only while an update waits for what it builds on.
//! - The linger after a close and the wait for a close frame after an oversized message run
//!   only while the connection is ending.
//! - A long-poll's wait is what the poll is (at most 30 s); it is not kept alive.
//!
//! What an idle WebSocket still carries besides its buffers and its entries here: one task,
//! its reader, waiting on the socket and the outbox. Its writer task runs only while something
//! is queued for the socket (see `super::writer`).

use crate::doc::ConnId;
use crate::doc::outbox::Outbox;
use bytes::Bytes;
use chorus_protocol::CloseCode;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a connection's protocol tells its client that its token expires at the given Unix
/// second (`None`: it cannot be encoded). Called by the sweep when the warning is due.
pub type WarnFrame = fn(expires_at: u64) -> Option<Bytes>;

/// y-websocket clients drop a socket after 30 s without any message (WebSocket pings never
/// reach their JavaScript), so y-websocket sockets get a harmless empty awareness update
/// ([`chorus_protocol::y_websocket::KEEPALIVE`]) this often.
const YJS_KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// What keeps a connection alive, and finds it dead.
pub enum Liveness {
    /// A WebSocket: pinged every ping interval, closed (4000) when its client has sent
    /// nothing, not even a pong, for the ping interval plus the ping timeout.
    Socket,
    /// A one-way stream (SSE): these bytes, already in its framing, every ping interval. Its
    /// client sends nothing, so it is never checked for silence; a reader that went away is
    /// found by the stream's own write timeout. (A reference, not the bytes: this is in every
    /// connection's entry, and a thin pointer keeps the entry as small as without it.)
    Stream(&'static Bytes),
}

/// What the sweep knows of one open connection for its heartbeat.
pub struct Live {
    outbox: Weak<Outbox>,
    /// Milliseconds since the node's start when the client last sent anything.
    last_seen: AtomicU64,
    liveness: Liveness,
}

/// Every connection whose token runs out, ordered by when it is next due.
#[derive(Default)]
struct Schedule {
    /// (due, connection): the first entry is the next thing the sweep must do.
    due: BTreeSet<(Instant, ConnId)>,
    /// What is due for each connection; exactly one `due` entry per connection here.
    held: HashMap<ConnId, Expiry>,
}

/// One connection's token deadline.
struct Expiry {
    outbox: Weak<Outbox>,
    /// The token's `exp` (Unix seconds): a refresh with the same lifetime is not warned twice.
    exp: u64,
    /// The warning still to send, and the frame it is.
    warn: Option<WarnFrame>,
    /// Its key in `Schedule::due`.
    next: Instant,
    expire_at: Instant,
}

/// What a due entry asks of its connection (done after the schedule's lock is released).
enum Act {
    Warn(Arc<Outbox>, Bytes),
    Expire(Arc<Outbox>),
}

impl Schedule {
    fn remove(&mut self, conn: ConnId) -> Option<Expiry> {
        let old = self.held.remove(&conn)?;
        self.due.remove(&(old.next, conn));
        Some(old)
    }

    fn insert(&mut self, conn: ConnId, expiry: Expiry) {
        self.due.insert((expiry.next, conn));
        self.held.insert(conn, expiry);
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Takes every entry due at `now`: a warning is re-filed for its expiry, an expiry leaves.
    fn take_due(&mut self, now: Instant, acts: &mut Vec<Act>) {
        while let Some(&(at, conn)) = self.due.first() {
            if at > now {
                break;
            }
            let Some(mut expiry) = self.remove(conn) else {
                continue;
            };
            let Some(outbox) = expiry.outbox.upgrade() else {
                continue;
            };
            match expiry.warn.take() {
                Some(frame) => {
                    if let Some(bytes) = frame(expiry.exp) {
                        acts.push(Act::Warn(outbox, bytes));
                    }
                    expiry.next = expiry.expire_at;
                    self.insert(conn, expiry);
                }
                None => acts.push(Act::Expire(outbox)),
            }
        }
    }
}

/// The node's sweep: one task, shared by every connection (see the module docs).
pub struct Sweep {
    started: Instant,
    /// Warnings go out this long before a token expires (`--token-warning`).
    warn_before: Duration,
    live: Mutex<HashMap<ConnId, Arc<Live>>>,
    schedule: Mutex<Schedule>,
    /// Told when a deadline earlier than every other was filed: the task re-arms its timer.
    sooner: Notify,
}

impl Sweep {
    pub fn new(warn_before: Duration) -> Self {
        Sweep {
            started: Instant::now(),
            warn_before,
            live: Mutex::new(HashMap::new()),
            schedule: Mutex::new(Schedule::default()),
            sooner: Notify::new(),
        }
    }

    fn live(&self) -> MutexGuard<'_, HashMap<ConnId, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Keeps the connection behind `outbox` alive as `liveness` says, until [`Sweep::forget`].
    pub fn watch(&self, outbox: &Arc<Outbox>, liveness: Liveness) -> Arc<Live> {
        let live = Arc::new(Live {
            outbox: Arc::downgrade(outbox),
            last_seen: AtomicU64::new(self.now_ms()),
            liveness,
        });
        self.live().insert(outbox.conn, live.clone());
        live
    }

    /// The client sent something: it is alive.
    pub fn seen(&self, live: &Live) {
        live.last_seen.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Files (or, after a token refresh, re-files) when the connection's token expires:
    /// `warn`'s frame goes out `--token-warning` before, and the connection is closed with
    /// 4101 at `exp`. `exp == None` (a token without expiry) drops what was filed.
    pub fn schedule_expiry(&self, outbox: &Arc<Outbox>, exp: Option<u64>, warn: Option<WarnFrame>) {
        let conn = outbox.conn;
        let mut schedule = self.schedule();
        let old = schedule.remove(conn);
        let Some(exp) = exp else {
            return;
        };
        let expire_at = instant_at(exp);
        // A refresh to a token that ends at the same second was warned already.
        let warned = old.is_some_and(|o| o.exp == exp && o.warn.is_none());
        let warn = warn.filter(|_| !warned);
        let next = match warn {
            Some(_) => expire_at.checked_sub(self.warn_before).unwrap_or(expire_at),
            None => expire_at,
        };
        let expiry = Expiry {
            outbox: Arc::downgrade(outbox),
            exp,
            warn,
            next,
            expire_at,
        };
        schedule.insert(conn, expiry);
        let first = schedule.next_due() == Some(next);
        drop(schedule);
        if first {
            self.sooner.notify_one();
        }
    }

    /// The connection ended: nothing more is done for it.
    pub fn forget(&self, conn: ConnId) {
        self.live().remove(&conn);
        self.schedule().remove(conn);
    }

    /// Starts the sweep's task: it ticks every `min(ping_interval, 15 s)` for the heartbeat
    /// and wakes for each token deadline as it falls due.
    pub fn spawn(
        self: &Arc<Self>,
        config: &crate::Config,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let this = self.clone();
        let mut beat = Beat::new(config);
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(beat.period());
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick.tick().await;
            let deadline = tokio::time::sleep_until(Instant::now());
            tokio::pin!(deadline);
            let mut acts = Vec::new();
            loop {
                let next = this.schedule().next_due();
                if let Some(at) = next {
                    deadline.as_mut().reset(at);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => this.beat(&mut beat),
                    _ = &mut deadline, if next.is_some() => {
                        this.schedule().take_due(Instant::now(), &mut acts);
                        act(acts.drain(..));
                    }
                    _ = this.sooner.notified() => {}
                }
            }
        });
    }

    /// One heartbeat pass over every open connection.
    fn beat(&self, beat: &mut Beat) {
        let (ping_due, keepalive_due) = beat.due(Instant::now());
        if !ping_due && !keepalive_due {
            return;
        }
        // Copied out: pushes may write to sockets, which is not done under the map's lock.
        let all: Vec<Arc<Live>> = self.live().values().cloned().collect();
        let now_ms = self.now_ms();
        for live in all {
            let Some(outbox) = live.outbox.upgrade() else {
                continue;
            };
            if let Liveness::Stream(keepalive) = live.liveness {
                if ping_due {
                    outbox.push_raw(keepalive.clone());
                }
                continue;
            }
            if ping_due {
                let seen = live.last_seen.load(Ordering::Relaxed);
                if now_ms.saturating_sub(seen) > beat.silence_limit_ms {
                    tracing::info!(
                        conn = outbox.conn,
                        "no frame or pong within the heartbeat timeout; closing"
                    );
                    outbox.request_close(CloseCode::HeartbeatTimeout);
                    continue;
                }
                outbox.push_raw(beat.ping.clone());
            }
            if keepalive_due
                && outbox.wire_id() == crate::doc::wire::Wire::id(&super::wires::Y_WEBSOCKET)
            {
                outbox.push_control(beat.keepalive.clone());
            }
        }
    }
}

/// Does what the due token deadlines ask.
fn act(acts: impl Iterator<Item = Act>) {
    for a in acts {
        match a {
            Act::Warn(outbox, frame) => {
                outbox.push_control(frame);
            }
            Act::Expire(outbox) => {
                tracing::info!(conn = outbox.conn, "token expired; closing");
                outbox.request_close(CloseCode::TokenExpired);
            }
        }
    }
}

/// The heartbeat's periods and what it sends.
struct Beat {
    ping_every: Duration,
    silence_limit_ms: u64,
    last_ping: Instant,
    last_keepalive: Instant,
    ping: Bytes,
    keepalive: Bytes,
}

impl Beat {
    fn new(config: &crate::Config) -> Self {
        Beat {
            ping_every: config.ping_interval,
            silence_limit_ms: (config.ping_interval + config.ping_timeout).as_millis() as u64,
            last_ping: Instant::now(),
            last_keepalive: Instant::now(),
            ping: super::socket::framed(super::socket::PING, &[]),
            keepalive: Bytes::from_static(chorus_protocol::y_websocket::KEEPALIVE),
        }
    }

    fn period(&self) -> Duration {
        self.ping_every.min(YJS_KEEPALIVE_EVERY)
    }

    /// Whether pings and keepalives are due at `now` (and, if so, restarts their periods).
    fn due(&mut self, now: Instant) -> (bool, bool) {
        let ping = now - self.last_ping >= self.ping_every;
        let keepalive = now - self.last_keepalive >= YJS_KEEPALIVE_EVERY;
        if ping {
            self.last_ping = now;
        }
        if keepalive {
            self.last_keepalive = now;
        }
        (ping, keepalive)
    }
}

/// Deadlines further out than this are filed at this distance: a token may carry any `exp`,
/// and an `Instant` that far ahead would overflow. (Such a connection lives for years before
/// it is due, and is then closed as expired, which it nearly is.)
const FARTHEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The instant a Unix time (seconds) falls on, at millisecond precision.
pub fn instant_at(unix_secs: u64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let ahead = Duration::from_millis(unix_secs.saturating_mul(1000).saturating_sub(now_ms));
    Instant::now() + ahead.min(FARTHEST)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::outbox::{OutboxLimits, OutboxStats};

    const WARN_BEFORE: Duration = Duration::from_secs(3);

    fn outbox(conn: ConnId, wire: &'static dyn crate::doc::wire::Wire) -> Arc<Outbox> {
        let limits = OutboxLimits {
            budget: 1 << 20,
            awareness_interval: Duration::from_millis(100),
        };
        Arc::new(Outbox::new(
            conn,
            wire,
            limits,
            Arc::new(OutboxStats::default()),
        ))
    }

    /// A running sweep; the tests run on tokio's paused clock, so its deadlines fall due as
    /// the test sleeps, without real waiting and without depending on the machine's speed.
    fn sweep() -> (Arc<Sweep>, CancellationToken, TaskTracker) {
        let sweep = Arc::new(Sweep::new(WARN_BEFORE));
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let mut config = crate::Config::for_data_dir("/tmp/unused");
        // No heartbeat traffic within a test's time span.
        config.ping_interval = Duration::from_secs(3600);
        sweep.spawn(&config, shutdown.clone(), &tracker);
        (sweep, shutdown, tracker)
    }

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn warning(expires_at: u64) -> Option<Bytes> {
        Some(Bytes::from(format!("expires at {expires_at}")))
    }

    /// (warnings, close) the sweep has asked of `outbox` so far.
    fn asked(outbox: &Outbox) -> (Vec<Bytes>, Option<CloseCode>) {
        let drained = outbox.drain();
        (drained.frames, drained.close)
    }

    async fn sleep_until(start: Instant, after: Duration) {
        tokio::time::sleep_until(start + after).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_is_warned_before_and_closed_with_4101_at_its_expiry() {
        let (sweep, shutdown, _tracker) = sweep();
        let o = outbox(1, &crate::connection::wires::NATIVE);
        let start = Instant::now();
        // Expires between 9 and 10 s from now (its second has begun).
        let exp = unix_now() + 10;
        sweep.schedule_expiry(&o, Some(exp), Some(warning));
        sleep_until(start, Duration::from_secs(5)).await;
        assert_eq!(asked(&o), (vec![], None), "nothing before the warning");
        sleep_until(start, Duration::from_secs(7)).await;
        let (frames, close) = asked(&o);
        assert_eq!(frames, vec![warning(exp).expect("frame")]);
        assert_eq!(close, None, "warned, not closed");
        sleep_until(start, Duration::from_millis(8900)).await;
        assert_eq!(asked(&o), (vec![], None), "still open before expiry");
        sleep_until(start, Duration::from_secs(10)).await;
        assert_eq!(asked(&o), (vec![], Some(CloseCode::TokenExpired)));
        assert!(sweep.schedule().held.is_empty(), "an expired entry leaves");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_moves_the_deadline_and_warns_again_only_for_a_new_expiry() {
        let (sweep, shutdown, _tracker) = sweep();
        let o = outbox(1, &crate::connection::wires::NATIVE);
        let start = Instant::now();
        let exp = unix_now() + 5;
        sweep.schedule_expiry(&o, Some(exp), Some(warning));
        sleep_until(start, Duration::from_secs(3)).await;
        assert_eq!(asked(&o).0.len(), 1, "warned");
        // The same lifetime again (a client refreshing with what it had): no second warning.
        sweep.schedule_expiry(&o, Some(exp), Some(warning));
        sleep_until(start, Duration::from_millis(3500)).await;
        assert_eq!(asked(&o), (vec![], None));
        // A fresh token, filed at 3.5 s on the paused clock (the wall clock stood still):
        // it expires between 23.5 and 24.5 s from the start. Nothing happens at the old
        // expiry; the new one is warned and closed.
        let later = unix_now() + 21;
        sweep.schedule_expiry(&o, Some(later), Some(warning));
        sleep_until(start, Duration::from_secs(15)).await;
        assert_eq!(
            asked(&o),
            (vec![], None),
            "refreshed: not closed at the old expiry"
        );
        sleep_until(start, Duration::from_secs(22)).await;
        assert_eq!(asked(&o), (vec![warning(later).expect("frame")], None));
        sleep_until(start, Duration::from_secs(23)).await;
        assert_eq!(asked(&o), (vec![], None), "warned, not closed");
        sleep_until(start, Duration::from_millis(24600)).await;
        assert_eq!(asked(&o).1, Some(CloseCode::TokenExpired));
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_filed_later_still_fires_on_time() {
        let (sweep, shutdown, _tracker) = sweep();
        let (late, soon) = (
            outbox(1, &crate::connection::wires::NATIVE),
            outbox(2, &crate::connection::wires::Y_WEBSOCKET),
        );
        let start = Instant::now();
        sweep.schedule_expiry(&late, Some(unix_now() + 100), None);
        // The task sleeps until the first deadline; this one must re-arm its timer.
        tokio::time::sleep(Duration::from_millis(10)).await;
        sweep.schedule_expiry(&soon, Some(unix_now() + 2), None);
        sleep_until(start, Duration::from_millis(2100)).await;
        assert_eq!(asked(&soon).1, Some(CloseCode::TokenExpired));
        assert_eq!(asked(&late).1, None);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn entries_leave_with_their_connection_or_their_token() {
        let (sweep, shutdown, _tracker) = sweep();
        let (a, b) = (
            outbox(1, &crate::connection::wires::NATIVE),
            outbox(2, &crate::connection::wires::NATIVE),
        );
        sweep.watch(&a, Liveness::Socket);
        sweep.schedule_expiry(&a, Some(unix_now() + 60), Some(warning));
        // A token far in the future (or at the end of time) is filed without overflow.
        sweep.schedule_expiry(&b, Some(u64::MAX), Some(warning));
        assert_eq!(sweep.schedule().held.len(), 2);
        // A refresh to a token without expiry drops the deadline.
        sweep.schedule_expiry(&b, None, None);
        sweep.forget(a.conn);
        {
            let schedule = sweep.schedule();
            assert!(schedule.held.is_empty() && schedule.due.is_empty());
        }
        assert!(sweep.live().is_empty());
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            asked(&a),
            (vec![], None),
            "a forgotten connection is left alone"
        );
        shutdown.cancel();
    }
}
