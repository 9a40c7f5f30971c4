//! One conformance suite, run against both backplanes: the embedded log and Redis streams.
//! Reads create nothing (a document's log is born with its first append), append, read after,
//! delivery in order with origins, wake-up on a newly watched document, trim, and a new epoch
//! when the log is lost. Then Redis specifics: a lost stream, Redis down, and reader rechecks
//! after a reconnect or a stall.

use bytes::Bytes;
use chorus_protocol::{DocId, StreamId};
use chorus_server::backplane::embedded::EmbeddedBackplane;
use chorus_server::backplane::redis::{RedisBackplane, RedisSettings};
use chorus_server::backplane::{Backplane, BackplaneError, Entry, EntrySink, LogHead, Origin};
use chorus_tests::redis::RedisServer;
use chorus_tests::{DEADLINE, eventually};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::task::TaskTracker;

#[derive(Default)]
struct Collect(Mutex<Vec<(String, u64, Entry)>>);

impl EntrySink for Collect {
    fn deliver(&self, doc: &DocId, epoch: u64, entries: Vec<Entry>) {
        let mut v = self.0.lock().expect("lock");
        for e in entries {
            v.push((doc.to_string(), epoch, e));
        }
    }
}

impl Collect {
    fn of(&self, doc: &str) -> Vec<(u64, Entry)> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(d, _, _)| d == doc)
            .map(|(_, ep, e)| (*ep, e.clone()))
            .collect()
    }
}

/// What differs between the backplanes: how to make one, and how to lose a log.
enum Fixture {
    Embedded {
        dir: tempfile::TempDir,
        tracker: TaskTracker,
    },
    Redis {
        server: RedisServer,
        tracker: TaskTracker,
    },
}

impl Fixture {
    async fn backplane(&self) -> Arc<dyn Backplane> {
        match self {
            Fixture::Embedded { dir, tracker } => Arc::new(
                EmbeddedBackplane::open(&dir.path().join("log.redb"), 4 << 20, tracker)
                    .expect("open"),
            ),
            Fixture::Redis { server, tracker } => Arc::new(
                RedisBackplane::connect(
                    RedisSettings::from_urls(
                        &[server.url()],
                        Duration::from_secs(2),
                        Duration::from_secs(2),
                    ),
                    rand::random(),
                    tracker,
                )
                .await
                .expect("connect"),
            ),
        }
    }

    /// Closes and opens the backplane again on the same storage (Redis: nothing to do).
    async fn reopen(&self, old: Arc<dyn Backplane>) -> Arc<dyn Backplane> {
        match self {
            Fixture::Embedded { .. } => {
                old.close().await;
                drop(old);
                self.backplane().await
            }
            Fixture::Redis { .. } => old,
        }
    }

    /// Redis keys of `doc` (the embedded log has no keys to list; `reopen` shows what it kept).
    async fn redis_keys(&self, doc: &str) -> Vec<String> {
        match self {
            Fixture::Embedded { .. } => Vec::new(),
            Fixture::Redis { server, .. } => server
                .cli(&["KEYS", &format!("chorus:{{{doc}}}:*")])
                .await
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    /// Loses every log (a new redb file; FLUSHALL) and returns the backplane to use after.
    async fn lose_logs(&self, old: Arc<dyn Backplane>) -> Arc<dyn Backplane> {
        match self {
            Fixture::Embedded { dir, .. } => {
                old.close().await;
                drop(old);
                std::fs::remove_file(dir.path().join("log.redb")).expect("remove log");
                self.backplane().await
            }
            Fixture::Redis { server, .. } => {
                server.cli(&["FLUSHALL"]).await;
                old
            }
        }
    }
}

fn origin(seq: u64) -> Option<Origin> {
    Some(Origin {
        node: 7,
        conn: 9,
        seq: Some(seq),
        chain: 0,
    })
}

async fn suite(fixture: Fixture) {
    let mut bp = fixture.backplane().await;
    let collect = Arc::new(Collect::default());
    let sink: Arc<dyn EntrySink> = collect.clone();
    bp.attach(Arc::downgrade(&sink));
    let a = DocId::parse("conf-a").expect("doc");
    let b = DocId::parse("conf-b").expect("doc");

    // Reads create nothing: a document nobody wrote has no log (epoch 0), stores no key or
    // row however often it is read and watched, and still has none after a restart. Epoch 0
    // is never a position to replay from.
    for _ in 0..3 {
        let (head, entries) = bp.read_after(&a, StreamId::ZERO).await.expect("read");
        assert_eq!(head, LogHead::NONE);
        assert!(entries.is_empty());
    }
    bp.watch(&a, StreamId::ZERO);
    bp.unwatch(&a);
    assert_eq!(fixture.redis_keys("conf-a").await, Vec::<String>::new());
    bp = fixture.reopen(bp).await;
    bp.attach(Arc::downgrade(&sink));
    let (head, _) = bp.read_after(&a, StreamId::ZERO).await.expect("read");
    assert_eq!(head, LogHead::NONE, "a read left nothing behind");
    bp.watch(&a, StreamId::ZERO);

    // Append: the first one creates the log with a fresh epoch; positions in call order, all
    // in that epoch. Calls are issued before any is awaited: admission order is the log order.
    let futs: Vec<_> = (0..5u64)
        .map(|i| bp.append(&a, Bytes::from(vec![i as u8; 3]), None, origin(i)))
        .collect();
    let mut ids = Vec::new();
    let mut epochs = Vec::new();
    for f in futs {
        let p = f.await.expect("append");
        epochs.push(p.epoch);
        ids.push(p.id);
    }
    let epoch = epochs[0];
    assert!(epoch != 0 && epoch < 1 << 53, "a fresh epoch: {epoch}");
    assert!(epochs.iter().all(|e| *e == epoch), "one epoch: {epochs:?}");
    let (head, _) = bp.read_after(&a, StreamId::ZERO).await.expect("read");
    assert_ne!(
        head.epoch, 0,
        "a position from before the log existed (epoch 0) matches no log: a full sync"
    );
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    // Delivery: every entry, in log order, once, with its origin and epoch.
    let delivered = eventually("all five entries delivered", DEADLINE, || async {
        let got = collect.of("conf-a");
        (got.len() >= 5).then_some(got)
    })
    .await;
    assert_eq!(
        delivered.iter().map(|(_, e)| e.id).collect::<Vec<_>>(),
        ids,
        "delivered in log order, no duplicates"
    );
    for (i, (ep, e)) in delivered.iter().enumerate() {
        assert_eq!(*ep, epoch);
        assert_eq!(e.origin, origin(i as u64), "origin round trip");
        assert_eq!(e.update.as_ref(), &[i as u8; 3]);
    }

    // Read after: exactly the entries after the id, and the head.
    let (head, entries) = bp.read_after(&a, ids[1]).await.expect("read");
    assert_eq!(head.epoch, epoch);
    assert_eq!(head.last, ids[4]);
    assert_eq!(
        entries.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    assert_eq!(entries[0].origin, origin(2));
    let (_, none) = bp.read_after(&a, ids[4]).await.expect("read");
    assert!(none.is_empty());

    // Wake-up: a document watched while the reader is (probably) blocked is read promptly.
    tokio::time::sleep(Duration::from_millis(50)).await;
    bp.watch(&b, StreamId::ZERO);
    let started = tokio::time::Instant::now();
    let pb = bp
        .append(&b, Bytes::from_static(b"b"), None, None)
        .await
        .expect("append b");
    eventually(
        "entry of a newly watched document delivered",
        DEADLINE,
        || async {
            collect
                .of("conf-b")
                .iter()
                .any(|(_, e)| e.id == pb.id)
                .then_some(())
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "a newly watched document must wake the reader, not wait for its timeout ({:?})",
        started.elapsed()
    );

    // Trim: entries below the id go, the floor is the newest removed one, replay stops there.
    bp.trim(&a, ids[2]).await.expect("trim");
    let (head, entries) = bp.read_after(&a, StreamId::ZERO).await.expect("read");
    assert_eq!(head.floor, ids[1]);
    assert_eq!(
        entries.iter().map(|e| e.id).collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    assert!(
        head.holds_after(ids[1]),
        "nothing after the floor was trimmed"
    );
    assert!(!head.holds_after(ids[0]), "ids[1] was trimmed");
    assert_eq!(
        (head.epoch, head.last, head.floor),
        (epoch, ids[4], ids[1]),
        "the log's head after the trim"
    );

    // Epoch change: the log is lost; the next append starts a new epoch, readers deliver it
    // with the new epoch, and old positions are not replayable.
    bp = fixture.lose_logs(bp).await;
    bp.attach(Arc::downgrade(&sink));
    bp.watch(&a, ids[4]);
    let p = bp
        .append(&a, Bytes::from_static(b"new"), None, origin(99))
        .await
        .expect("append after loss");
    assert_ne!(p.epoch, epoch, "a lost log gets a new epoch");
    let (head, entries) = bp.read_after(&a, StreamId::ZERO).await.expect("read");
    assert_eq!(head.epoch, p.epoch);
    assert_eq!(entries.len(), 1, "the new log holds only what came after");
    assert_ne!(head.epoch, epoch, "positions of the lost log match no more");
    eventually("entry of the new epoch delivered", DEADLINE, || async {
        collect
            .of("conf-a")
            .iter()
            .any(|(ep, e)| *ep == p.epoch && e.id == p.id)
            .then_some(())
    })
    .await;
    bp.close().await;
}

#[tokio::test]
async fn embedded_backplane_conforms() {
    suite(Fixture::Embedded {
        dir: tempfile::tempdir().expect("tempdir"),
        tracker: TaskTracker::new(),
    })
    .await;
}

#[tokio::test]
async fn redis_backplane_conforms() {
    suite(Fixture::Redis {
        server: RedisServer::start().await,
        tracker: TaskTracker::new(),
    })
    .await;
}

/// A Redis backplane that gives up on a round trip after 500 ms (faults show quickly).
async fn redis_with_short_timeout(server: &RedisServer, tracker: &TaskTracker) -> RedisBackplane {
    RedisBackplane::connect(
        RedisSettings::from_urls(
            &[server.url()],
            Duration::from_millis(500),
            Duration::from_secs(2),
        ),
        1,
        tracker,
    )
    .await
    .expect("connect")
}

/// Redis specifics the shared suite cannot express: a log whose stream key alone was deleted
/// is a lost log too (new epoch), and appends with Redis down fail within the bound and are
/// never acknowledged.
#[tokio::test]
async fn redis_detects_a_deleted_stream_and_fails_appends_when_down() {
    let mut server = RedisServer::start().await;
    let tracker = TaskTracker::new();
    let bp = redis_with_short_timeout(&server, &tracker).await;
    let d = DocId::parse("del").expect("doc");
    let p1 = bp
        .append(&d, Bytes::from_static(b"1"), None, None)
        .await
        .expect("append");
    server.cli(&["DEL", "chorus:{del}:log"]).await;
    let p2 = bp
        .append(&d, Bytes::from_static(b"2"), None, None)
        .await
        .expect("append");
    assert_ne!(p1.epoch, p2.epoch, "a deleted stream means a new epoch");

    server.kill9().await;
    let started = tokio::time::Instant::now();
    let r = bp.append(&d, Bytes::from_static(b"3"), None, None).await;
    assert!(r.is_err(), "no ack without Redis: {r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failure within the bound ({:?})",
        started.elapsed()
    );
    server.restart().await;
    let p3 = eventually(
        "appends work again after Redis is back",
        DEADLINE,
        || async {
            bp.append(&d, Bytes::from_static(b"4"), None, None)
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(p3.epoch, p2.epoch, "AOF kept the log and its epoch");
    bp.close().await;
}

/// Records deliveries and rechecks.
#[derive(Default)]
struct Rechecks {
    delivered: Mutex<Vec<StreamId>>,
    rechecked: Mutex<Vec<String>>,
}

impl EntrySink for Rechecks {
    fn deliver(&self, _doc: &DocId, _epoch: u64, entries: Vec<Entry>) {
        self.delivered
            .lock()
            .expect("lock")
            .extend(entries.iter().map(|e| e.id));
    }

    fn recheck(&self, doc: &DocId) {
        self.rechecked.lock().expect("lock").push(doc.to_string());
    }
}

impl Rechecks {
    async fn wait_delivered(&self, id: StreamId) {
        eventually("the reader delivers the entry", DEADLINE, || async {
            self.delivered
                .lock()
                .expect("lock")
                .contains(&id)
                .then_some(())
        })
        .await;
    }

    async fn wait_rechecked(&self, doc: &str) {
        eventually(
            "the reader asks the document to recheck",
            DEADLINE,
            || async {
                self.rechecked
                    .lock()
                    .expect("lock")
                    .iter()
                    .any(|d| d == doc)
                    .then_some(())
            },
        )
        .await;
    }

    fn rechecks(&self) -> usize {
        self.rechecked.lock().expect("lock").len()
    }
}

/// A backplane on `urls` with a [`Rechecks`] sink, watching `doc`, after one entry went
/// through its reader (so the reader's first connection is up and reading).
async fn watching(
    urls: &[String],
    timeout: Duration,
    doc: &DocId,
    tracker: &TaskTracker,
) -> (RedisBackplane, Arc<Rechecks>) {
    let bp = RedisBackplane::connect(
        RedisSettings::from_urls(urls, timeout, Duration::from_secs(2)),
        rand::random(),
        tracker,
    )
    .await
    .expect("connect");
    let sink = Arc::new(Rechecks::default());
    let weak: std::sync::Weak<dyn EntrySink> =
        Arc::downgrade(&(sink.clone() as Arc<dyn EntrySink>));
    bp.attach(weak);
    bp.watch(doc, StreamId::ZERO);
    let p = bp
        .append(doc, Bytes::from_static(b"1"), None, None)
        .await
        .expect("append");
    sink.wait_delivered(p.id).await;
    assert_eq!(
        sink.rechecks(),
        0,
        "no recheck on a reader's first connection"
    );
    (bp, sink)
}

/// A reader whose connection broke may have missed a trim while it was away: once it is back,
/// every document it reads rechecks its log; then reading goes on.
#[tokio::test]
async fn redis_reader_rechecks_its_documents_after_a_reconnect() {
    let server = RedisServer::start().await;
    let tracker = TaskTracker::new();
    let doc = DocId::parse("back").expect("doc");
    let (bp, sink) = watching(&[server.url()], Duration::from_secs(2), &doc, &tracker).await;
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    sink.wait_rechecked("back").await;
    let p = eventually("appends work again", DEADLINE, || async {
        bp.append(&doc, Bytes::from_static(b"2"), None, None)
            .await
            .ok()
    })
    .await;
    sink.wait_delivered(p.id).await;
    bp.close().await;
}

/// A reader whose reads were held up longer than `READER_STALL` (here Redis pauses every
/// client for longer than that, without breaking a connection) asks its documents to recheck.
#[tokio::test]
async fn redis_reader_rechecks_its_documents_after_a_stall() {
    let server = RedisServer::start().await;
    let tracker = TaskTracker::new();
    let doc = DocId::parse("stalled").expect("doc");
    // A round-trip bound longer than the pause: the read completes late instead of failing.
    let (bp, sink) = watching(&[server.url()], Duration::from_secs(10), &doc, &tracker).await;
    let pause = chorus_server::backplane::READER_STALL + Duration::from_millis(1500);
    server
        .cli(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "ALL"])
        .await;
    sink.wait_rechecked("stalled").await;
    bp.close().await;
}

/// The same for a cluster shard reader (every master pauses its clients). A dropped connection
/// does not reach a cluster reader as an error (the cluster client reconnects and retries by
/// itself), so for it the stall is what matters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_reader_rechecks_its_documents_after_a_stall() {
    let cluster = chorus_tests::redis::RedisCluster::start().await;
    let tracker = TaskTracker::new();
    let doc = DocId::parse("stalled").expect("doc");
    let (bp, sink) = watching(&[cluster.url()], Duration::from_secs(10), &doc, &tracker).await;
    let pause = chorus_server::backplane::READER_STALL + Duration::from_millis(1500);
    for &p in &cluster.ports {
        chorus_tests::redis::cli(
            p,
            &["CLIENT", "PAUSE", &pause.as_millis().to_string(), "ALL"],
        )
        .await;
    }
    sink.wait_rechecked("stalled").await;
    bp.close().await;
}

/// A connection's appends to a document succeed as a prefix: once one fails (Redis away),
/// the ones it made before it heard of the failure are refused even after Redis is back —
/// they may build on the failed one, and a log holding an update without what it builds on
/// leaves every reader with an update it cannot integrate. A new chain goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_the_rest_of_a_chain_whose_append_failed() {
    let mut server = RedisServer::start().await;
    let tracker = TaskTracker::new();
    let bp = redis_with_short_timeout(&server, &tracker).await;
    let d = DocId::parse("chain").expect("doc");
    let from = |conn, chain| {
        Some(Origin {
            node: 7,
            conn,
            seq: None,
            chain,
        })
    };
    bp.append(&d, Bytes::from_static(b"1"), None, from(1, 0))
        .await
        .expect("append");
    server.kill9().await;
    let failed = bp
        .append(&d, Bytes::from_static(b"2"), None, from(1, 0))
        .await;
    assert!(failed.is_err(), "no ack without Redis: {failed:?}");
    server.restart().await;
    // Another connection's appends are not held back: they show Redis is back.
    eventually(
        "appends work again after Redis is back",
        DEADLINE,
        || async {
            bp.append(&d, Bytes::from_static(b"x"), None, from(2, 0))
                .await
                .ok()
        },
    )
    .await;
    let same_chain = bp
        .append(&d, Bytes::from_static(b"3"), None, from(1, 0))
        .await;
    assert!(
        matches!(same_chain, Err(BackplaneError::EarlierAppendFailed)),
        "the failed append's chain is broken: {same_chain:?}"
    );
    bp.append(&d, Bytes::from_static(b"4"), None, from(1, 1))
        .await
        .expect("a new chain is written");
    bp.close().await;
}
