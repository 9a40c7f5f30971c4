//! Change webhooks (after data-flow step 4): documents with undelivered changes → one signed POST per URL per debounced range.
//!
//! How a change becomes a request:
//!
//! 1. The append marks the document as undelivered, durably and atomically with the entry
//!    (`backplane::webhook_store`): Redis inside the append script; embedded in the checkpoint
//!    transaction, or from the write-ahead replay after a crash. The write door also tells
//!    this node at once ([`Webhooks::note`]), so the first delivery does not wait for a scan.
//! 2. Every node scans the marks (at start and every [`SCAN_EVERY`], [`SCAN_BATCH`] at a time)
//!    and starts a sender for each marked document it is not already sending.
//! 3. A sender first takes the document's lease (Redis `SET NX PX`, renewed each cycle and
//!    while it waits, every third of `--webhook-lease`): one node sends a document's webhooks
//!    at a time. Without the lease it stops; the node holding it sends, and if that node dies
//!    the lease expires and the next scan anywhere takes over.
//! 4. The sender reads the log after the lowest URL cursor (the durable last position
//!    delivered per document and URL; later wakes read only what follows, `view.rs`) and
//!    sends each URL its range once
//!    `now ≥ min(last change + debounce, first unsent change + max wait)`. Change times come
//!    from the entry ids (their append time in ms), so any node computes the same deadline.
//! 5. A 2xx answer moves that URL's cursor to `to`; anything else (or no answer within
//!    `--webhook-timeout`) retries with [`deliver::backoff`]. Each URL has its own cursor and
//!    clock, so a failing URL holds nobody else back; changes made meanwhile fold into the
//!    next attempt's range (nothing queues: the range is just `(cursor, head]`).
//! 6. When every cursor reached the head, the mark is cleared only if the head is still the
//!    one read (compare-and-clear), and the sender stops and releases the lease.
//!
//! Ranges and resync: `from` is the URL's cursor, `null` when it has none in the log's current
//! epoch (first delivery, or the log was recreated) and the receiver must load the whole
//! document. `updates`/`bytes` count the entries in (from, to] the sender read from the log:
//! if compaction trimmed past the cursor before it read them (a receiver down longer than
//! `--replay-window`), only what was left, and the receiver's
//! `GET /v1/docs/{doc}/updates?after=FROM` answers with its documented full sync instead of a
//! replay. `from` stays the cursor either way: it is what the receiver has.
//!
//! Delivery ids are per attempt (receivers dedupe by position). Bounds: at most
//! [`MAX_TRACKED`] documents have a sender on one node (more stay marked and are picked up as
//! senders finish); at most [`deliver::MAX_IN_FLIGHT`] requests are in flight; a sender holds
//! the ids and sizes of its document's unsent changes, at most `view::MAX_CHANGES` (100,000).

pub mod deliver;
mod view;

use crate::backplane::webhook_store::{ScanCursor, WebhookStore};
use crate::backplane::{Backplane, BackplaneResult, LogHead, now_ms};
use crate::config::{Config, ConfigError};
use chorus_protocol::{DocId, Position, StreamId};
use deliver::{Changed, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use view::LogView;

/// Documents with a running sender on one node. Past it, marked documents wait (durably) for
/// a sender to finish; nothing is lost, only later.
pub const MAX_TRACKED: usize = 10_000;
/// How often every node looks for marked documents nobody sends (a dead lease holder's).
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Marks read per scan call.
pub const SCAN_BATCH: usize = 256;
/// Before reading again when the head moved under a compare-and-clear.
const RACE_PAUSE: Duration = Duration::from_millis(50);

const DELIVERED: &str = "chorus_webhook_deliveries_total";
const PENDING: &str = "chorus_webhook_pending_documents";

/// What `--webhook-*` configure.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub urls: Vec<String>,
    pub secret: String,
    pub debounce: Duration,
    pub max_wait: Duration,
    pub timeout: Duration,
    pub lease: Duration,
}

impl WebhookSettings {
    /// `None` when no `--webhook-url` is set.
    pub fn from_config(c: &Config) -> Option<Self> {
        if c.webhook_url.is_empty() {
            return None;
        }
        Some(WebhookSettings {
            urls: c.webhook_url.clone(),
            secret: c.webhook_secret.clone().unwrap_or_default(),
            debounce: c.webhook_debounce,
            max_wait: c.webhook_max_wait,
            timeout: c.webhook_timeout,
            lease: c.webhook_lease,
        })
    }
}

/// The `--webhook-*` checks `Config::validate` makes.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    if c.webhook_url.is_empty() {
        return Ok(());
    }
    if c.webhook_secret.as_deref().unwrap_or("").is_empty() {
        return Err(ConfigError::WebhookWithoutSecret);
    }
    for url in &c.webhook_url {
        let ok = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(ConfigError::WebhookUrl { url: url.clone() });
        }
    }
    if c.webhook_lease <= c.webhook_timeout {
        return Err(ConfigError::WebhookLeaseTooShort {
            lease: c.webhook_lease,
            timeout: c.webhook_timeout,
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Store(#[from] crate::backplane::BackplaneError),
    #[error("webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The node's webhook service: cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    settings: WebhookSettings,
    store: Arc<dyn WebhookStore>,
    backplane: Arc<dyn Backplane>,
    sender: Sender,
    senders: Mutex<Senders>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

/// The documents this node sends for, and those it found leased by another node.
#[derive(Default)]
struct Senders {
    /// Per document: set when the write door noted a change since the sender last read.
    running: HashMap<DocId, Arc<AtomicBool>>,
    /// Leased elsewhere: not tried again before the instant (bounded like `running`).
    elsewhere: HashMap<DocId, Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Webhooks {
    /// Turns the log's marks on (before any append) and starts the scanner on `tracker`;
    /// everything stops when `stop` is cancelled.
    pub fn start(
        settings: WebhookSettings,
        backplane: Arc<dyn Backplane>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, WebhookError> {
        let store = backplane.enable_webhooks()?;
        let sender = Sender::new(&settings.secret, settings.timeout)?;
        metrics::describe_counter!(DELIVERED, "Webhook requests, by result (ok, failed)");
        metrics::describe_gauge!(PENDING, "Documents this node is sending webhooks for");
        let hooks = Webhooks {
            inner: Arc::new(Inner {
                settings,
                store,
                backplane,
                sender,
                senders: Mutex::new(Senders::default()),
                tracker: tracker.clone(),
                stop,
            }),
        };
        tracker.spawn(hooks.clone().scan_forever());
        Ok(hooks)
    }

    /// The write door appended to `doc`: make sure a sender runs for it.
    pub fn note(&self, doc: &DocId) {
        let mut senders = lock(&self.inner.senders);
        if let Some(noted) = senders.running.get(doc) {
            noted.store(true, Ordering::Release);
            return;
        }
        if senders
            .elsewhere
            .get(doc)
            .is_some_and(|until| *until > Instant::now())
        {
            return;
        }
        self.spawn_sender(&mut senders, doc);
    }

    fn spawn_sender(&self, senders: &mut Senders, doc: &DocId) {
        if senders.running.len() >= MAX_TRACKED || self.inner.stop.is_cancelled() {
            return; // the durable mark brings it back on a later scan
        }
        let noted = Arc::new(AtomicBool::new(true));
        senders.running.insert(doc.clone(), noted.clone());
        senders.elsewhere.remove(doc);
        metrics::gauge!(PENDING).set(senders.running.len() as f64);
        let hooks = self.clone();
        let doc = doc.clone();
        self.inner.tracker.spawn(async move {
            let outcome = hooks.send_for(&doc, &noted).await;
            if let Err(e) = &outcome {
                tracing::warn!(%doc, error = %e, "webhook sender stopped; the next scan retries");
            }
            // A sender that delivered everything released and unlisted itself already.
            if !matches!(outcome, Ok(Ended::Delivered)) {
                hooks.inner.store.release(&doc).await;
            }
            let mut senders = lock(&hooks.inner.senders);
            if senders
                .running
                .get(&doc)
                .is_some_and(|n| Arc::ptr_eq(n, &noted))
            {
                senders.running.remove(&doc);
            }
            if matches!(outcome, Ok(Ended::LeasedElsewhere)) {
                if senders.elsewhere.len() >= MAX_TRACKED {
                    let now = Instant::now();
                    senders.elsewhere.retain(|_, until| *until > now);
                }
                if senders.elsewhere.len() < MAX_TRACKED {
                    // Not before the next scan would find it anyway: an append noted here
                    // then costs no lease attempt while the holder sends.
                    let until = Instant::now() + SCAN_EVERY.min(hooks.inner.settings.lease / 2);
                    senders.elsewhere.insert(doc.clone(), until);
                }
            }
            metrics::gauge!(PENDING).set(senders.running.len() as f64);
        });
    }

    /// Every [`SCAN_EVERY`]: starts senders for marked documents nobody here sends.
    async fn scan_forever(self) {
        loop {
            if let Err(e) = self.scan_once().await {
                tracing::warn!(error = %e, "scanning undelivered webhooks failed; retrying");
            }
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(SCAN_EVERY) => {}
            }
        }
    }

    async fn scan_once(&self) -> BackplaneResult<()> {
        let mut from: ScanCursor = None;
        loop {
            let (docs, next) = self.inner.store.marked(from, SCAN_BATCH).await?;
            {
                let mut senders = lock(&self.inner.senders);
                let now = Instant::now();
                senders.elsewhere.retain(|_, until| *until > now);
                for doc in &docs {
                    if !senders.running.contains_key(doc) && !senders.elsewhere.contains_key(doc) {
                        self.spawn_sender(&mut senders, doc);
                    }
                }
            }
            if next.is_none() || self.inner.stop.is_cancelled() {
                return Ok(());
            }
            from = next;
        }
    }
}

/// Why a sender stopped.
enum Ended {
    /// Every URL has the head and the mark is cleared.
    Delivered,
    /// Another node holds the lease.
    LeasedElsewhere,
    Shutdown,
}

/// One URL's place in one document, as its sender knows it.
struct UrlState {
    url: String,
    /// Last delivered position (durable in the store).
    cursor: Option<Position>,
    failures: u32,
    /// After a failure: no attempt before.
    retry_at: Option<Instant>,
}

impl UrlState {
    /// `from` for a request to this URL about `head`: the cursor if it is in the same epoch.
    fn from(&self, head: &LogHead) -> Option<Position> {
        self.cursor.filter(|c| c.epoch == head.epoch)
    }

    fn behind(&self, head: &LogHead) -> bool {
        if head.epoch == 0 {
            return false; // no log (any more): nothing to tell
        }
        self.from(head).is_none_or(|c| c.id < head.last)
    }
}

impl Webhooks {
    /// The sender of one document: runs until every URL has the head, the lease is lost, or
    /// the node stops.
    async fn send_for(&self, doc: &DocId, noted: &AtomicBool) -> BackplaneResult<Ended> {
        let inner = &self.inner;
        if !inner.store.lease(doc, inner.settings.lease).await? {
            return Ok(Ended::LeasedElsewhere);
        }
        let mut urls = Vec::with_capacity(inner.settings.urls.len());
        for url in &inner.settings.urls {
            urls.push(UrlState {
                url: url.clone(),
                cursor: inner.store.cursor(doc, url).await?,
                failures: 0,
                retry_at: None,
            });
        }
        let mut view = LogView::default();
        loop {
            noted.store(false, Ordering::Release);
            let cursors: Vec<Option<Position>> = urls.iter().map(|u| u.cursor).collect();
            view.refresh(&*inner.backplane, doc, &cursors).await?;
            let head = view.head();
            if !urls.iter().any(|u| u.behind(&head)) {
                if inner
                    .store
                    .clear_if_head(doc, head.epoch, head.last)
                    .await?
                {
                    // Release first, then unlist under the lock `note` takes: an append noted
                    // before the unlisting finds this sender and keeps it going (it takes the
                    // lease again); one noted after starts a new sender.
                    inner.store.release(doc).await;
                    {
                        let mut senders = lock(&inner.senders);
                        if !noted.load(Ordering::Acquire) {
                            senders.running.remove(doc);
                            return Ok(Ended::Delivered);
                        }
                    }
                    if !inner.store.lease(doc, inner.settings.lease).await? {
                        return Ok(Ended::LeasedElsewhere);
                    }
                    continue; // noted meanwhile: read again
                }
                // An append raced with the check: read again, after a pause that keeps a
                // log that keeps disagreeing from being asked in a tight loop.
                if !self.wait_until(doc, Instant::now() + RACE_PAUSE).await? {
                    return Ok(self.interrupted());
                }
                continue;
            }
            let next = self.deliver_due(doc, &view, &mut urls).await;
            if !self.wait_until(doc, next).await? {
                return Ok(self.interrupted());
            }
        }
    }

    /// Sends every URL whose range is due (concurrently) and records the outcomes; returns
    /// when the next one is due.
    async fn deliver_due(&self, doc: &DocId, view: &LogView, urls: &mut [UrlState]) -> Instant {
        let settings = &self.inner.settings;
        let now = Instant::now();
        let (jobs, mut next) = due_requests(settings, doc, view, urls, now);
        if jobs.is_empty() {
            return next;
        }
        let sender = &self.inner.sender;
        let sends = futures_util::future::join_all(
            jobs.iter()
                .map(|job| sender.send(&urls[job.url].url, &job.body)),
        );
        // Renewed while requests are in flight (a request may wait for a permit first), so
        // no other node starts on this document meanwhile.
        let renew = async {
            loop {
                tokio::time::sleep(settings.lease / 3).await;
                if let Err(e) = self.inner.store.lease(doc, settings.lease).await {
                    tracing::warn!(%doc, error = %e, "could not renew a webhook lease");
                }
            }
        };
        // At shutdown an unanswered request is dropped: its range stays undelivered and
        // marked, so the next sender (here after a restart, or another node) sends it.
        let results = tokio::select! {
            r = sends => r,
            () = renew => return now,
            () = self.inner.stop.cancelled() => return now,
        };
        for (job, result) in jobs.into_iter().zip(results) {
            let u = &mut urls[job.url];
            match result {
                Ok(()) => {
                    metrics::counter!(DELIVERED, "result" => "ok").increment(1);
                    // Read again at once: either the mark can go or there is more to send.
                    next = now;
                    u.cursor = Some(job.to);
                    u.failures = 0;
                    u.retry_at = None;
                    if let Err(e) = self.inner.store.set_cursor(doc, &u.url, job.to).await {
                        // Delivered but not recorded: after a restart it is sent again
                        // (at least once), never skipped.
                        tracing::warn!(%doc, url = %u.url, error = %e, "could not record a webhook delivery");
                    }
                }
                Err(e) => {
                    metrics::counter!(DELIVERED, "result" => "failed").increment(1);
                    u.failures = u.failures.saturating_add(1);
                    let wait = deliver::backoff(u.failures);
                    u.retry_at = Some(Instant::now() + wait);
                    next = next.min(Instant::now() + wait);
                    tracing::info!(%doc, url = %u.url, error = %e, failures = u.failures, retry_in_ms = wait.as_millis() as u64, "webhook delivery failed");
                }
            }
        }
        next
    }

    /// Why a wait ended early: the node is stopping, or another node has the lease.
    fn interrupted(&self) -> Ended {
        if self.inner.stop.is_cancelled() {
            Ended::Shutdown
        } else {
            Ended::LeasedElsewhere
        }
    }

    /// Sleeps until `due`, renewing the lease on the way; false if it was lost or the node
    /// is stopping.
    async fn wait_until(&self, doc: &DocId, due: Instant) -> BackplaneResult<bool> {
        let inner = &self.inner;
        loop {
            let renew_at = Instant::now() + inner.settings.lease / 3;
            tokio::select! {
                () = inner.stop.cancelled() => return Ok(false),
                () = tokio::time::sleep_until(due.min(renew_at)) => {}
            }
            if !inner.store.lease(doc, inner.settings.lease).await? {
                return Ok(false);
            }
            if Instant::now() >= due {
                return Ok(true);
            }
        }
    }
}

/// One request to make: to `urls[url]`, the range up to `to`.
struct Job {
    url: usize,
    to: Position,
    body: Changed,
}

/// The requests due now (one per URL that is behind, past its debounce or max wait and its
/// retry time), and when the next URL not due yet will be (at the latest a lease period from
/// now). Change times are the entry ids' append times, on the appending node's clock.
fn due_requests(
    settings: &WebhookSettings,
    doc: &DocId,
    view: &LogView,
    urls: &[UrlState],
    now: Instant,
) -> (Vec<Job>, Instant) {
    let head = &view.head();
    let now_wall = now_ms();
    let mut next = now + settings.lease;
    let mut jobs = Vec::new();
    for (i, u) in urls.iter().enumerate() {
        if !u.behind(head) {
            continue;
        }
        let from = u.from(head);
        let unsent = view.after(from.map_or(StreamId::ZERO, |p| p.id));
        let first_ms = unsent.first().map_or(head.last.ms, |e| e.id.ms);
        let after_last = head
            .last
            .ms
            .saturating_add(settings.debounce.as_millis() as u64);
        let after_first = first_ms.saturating_add(settings.max_wait.as_millis() as u64);
        let due = now + Duration::from_millis(after_last.min(after_first).saturating_sub(now_wall));
        let due = u.retry_at.map_or(due, |r| r.max(due));
        if due > now {
            next = next.min(due);
            continue;
        }
        let to = Position::new(head.epoch, head.last);
        let bytes = unsent.iter().map(|c| c.bytes).sum();
        jobs.push(Job {
            url: i,
            to,
            body: Changed::new(doc, from, to, unsent.len() as u64, bytes),
        });
    }
    (jobs, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_flags_are_checked_at_start() {
        let mut c = Config::for_data_dir("/tmp/x");
        assert!(validate(&c).is_ok(), "no webhooks, nothing to check");
        c.webhook_url = vec!["http://127.0.0.1:9/hook".into()];
        assert!(matches!(
            validate(&c),
            Err(ConfigError::WebhookWithoutSecret)
        ));
        c.webhook_secret = Some("s".into());
        assert!(validate(&c).is_ok());
        c.webhook_url.push("ftp://example.com/".into());
        assert!(matches!(validate(&c), Err(ConfigError::WebhookUrl { .. })));
        c.webhook_url.pop();
        c.webhook_lease = c.webhook_timeout;
        assert!(matches!(
            validate(&c),
            Err(ConfigError::WebhookLeaseTooShort { .. })
        ));
    }

    #[test]
    fn a_url_is_behind_until_its_cursor_reaches_the_head_of_the_same_epoch() {
        let at3 = Position::new(7, StreamId::new(3, 0));
        let head = LogHead {
            epoch: 7,
            last: StreamId::new(5, 0),
            floor: StreamId::ZERO,
        };
        let url = |cursor| UrlState {
            url: String::new(),
            cursor,
            failures: 0,
            retry_at: None,
        };
        assert!(url(Some(at3)).behind(&head));
        assert_eq!(url(Some(at3)).from(&head), Some(at3));
        let other_epoch = Position::new(8, StreamId::new(5, 0));
        assert_eq!(
            url(Some(other_epoch)).from(&head),
            None,
            "a new epoch restarts"
        );
        assert!(url(Some(other_epoch)).behind(&head));
        assert!(!url(Some(Position::new(7, head.last))).behind(&head));
        assert!(!url(None).behind(&LogHead::NONE), "no log, nothing to send");
    }
}
