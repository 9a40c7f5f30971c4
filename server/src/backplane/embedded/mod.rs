//! The embedded backplane (data-flow steps 4–5 on one node): each document's log, acknowledged once its group is fsynced in a write-ahead file, kept in one local redb file.
//!
//! Why redb and not only a hand-rolled append file: we need per-document range reads (replay
//! after a position), range deletes (trim after a snapshot), a small metadata row per document
//! (epoch, last id, trim floor) and crash safety — redb gives all four with copy-on-write pages
//! and a checksummed commit. Plain files would need our own index and compaction.
//!
//! Why a write-ahead file in front of it: a redb commit per group costs its B-tree page writes,
//! checksums and an fsync of every page it touched — over half of a node's CPU per update when
//! the log is not busy enough to group many. Here one writer thread takes every append waiting
//! at that moment, writes them as records to the current segment with one `write` and one
//! `fdatasync` (`wal.rs`), and only then answers the appenders and hands the entries to the
//! sink. The entries wait in their segment (`Pending` keeps where each lies, and reads find
//! them there) until a checkpoint thread writes a whole segment's worth to redb in one
//! transaction, about once a second, and deletes the segment. At open, segments left by a crash are replayed into redb first.
//!
//! Its parts, one file each: `writer.rs` (the append queue and group commit), `wal.rs` (the
//! segment format and writing it), `shared.rs` (the pending set and the active segment),
//! `checkpoint.rs` (segments into redb, and replay at open), `wal_replay.rs` (reading
//! segments back: torn tail or damage) and `store.rs` (the redb tables, heads, reads, trims).

mod checkpoint;
mod hooks;
mod shared;
mod store;
mod wal;
pub(super) mod wal_replay;
mod writer;

use super::{
    Backplane, BackplaneError, BackplaneResult, Entry, EntrySink, LogHead, Origin, answer,
};
use crate::validate::Reach;
use bytes::Bytes;
use checkpoint::{CHECKPOINT_AFTER, Checkpoints, replay};
use chorus_protocol::{DocId, Position, StreamId};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::ReadableDatabase;
use shared::{Active, Pending, Shared};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use store::{head_in, read_after};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use wal::Segment;
use writer::{QUEUE_CAPACITY, WriteOp, Writer};

pub struct EmbeddedBackplane {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<WriteOp>>>,
    sink: Arc<OnceLock<Weak<dyn EntrySink>>>,
    tracker: TaskTracker,
    /// The writer's and the checkpoint thread's ends; `close` waits for both, after which
    /// the database file is free to open again.
    threads_done: Mutex<Vec<oneshot::Receiver<()>>>,
}

fn storage<E: std::fmt::Display>(e: E) -> BackplaneError {
    BackplaneError::Storage(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EmbeddedBackplane {
    /// Opens (or creates) `path`, replays any write-ahead segments a crash left beside it,
    /// and starts the writer and the checkpoint thread on `tracker`. `cache_bytes` bounds
    /// redb's page cache (its default, 1 GiB, would let the log's recent pages grow the
    /// process by as much as was written); hot documents keep their own recent entries, so
    /// the cache mostly serves loads and catch-ups.
    pub fn open(path: &Path, cache_bytes: usize, tracker: &TaskTracker) -> BackplaneResult<Self> {
        Self::open_with(path, cache_bytes, tracker, CHECKPOINT_AFTER)
    }

    /// [`open`](Self::open) with the age at which a segment is checkpointed.
    fn open_with(
        path: &Path,
        cache_bytes: usize,
        tracker: &TaskTracker,
        checkpoint_after: Duration,
    ) -> BackplaneResult<Self> {
        let (db, wal_id) = store::open_db(path, cache_bytes)?;

        let (last_seq, replayed) = replay(&db, path, wal_id)?;
        let segment = Segment::create(path, last_seq + 1, wal_id, None).map_err(storage)?;

        let shared = Arc::new(Shared {
            db,
            pending: Mutex::new(Pending::default()),
            active: Mutex::new(Active {
                segment: Some(segment),
                next_seq: last_seq + 2,
                dirty_since: None,
                cut: None,
            }),
            base: path.to_path_buf(),
            wal_id,
            checkpoint_after,
            hooks_on: Default::default(),
            replayed: Mutex::new(replayed),
        });
        let checkpoints = Arc::new(Checkpoints::default());
        let (checkpoints_done, checkpoints_done_rx) = oneshot::channel();
        {
            let shared = shared.clone();
            let checkpoints = checkpoints.clone();
            tracker.spawn_blocking(move || {
                checkpoints.serve(&shared);
                drop(shared);
                let _ = checkpoints_done.send(());
            });
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let sink: Arc<OnceLock<Weak<dyn EntrySink>>> = Arc::new(OnceLock::new());
        let (done_tx, done_rx) = oneshot::channel();
        let writer = Writer {
            shared: shared.clone(),
            sink: sink.clone(),
            checkpoints,
            chains: Default::default(),
        };
        tracker.spawn_blocking(move || {
            writer.run(rx);
            let _ = done_tx.send(());
        });
        Ok(EmbeddedBackplane {
            shared,
            tx: Mutex::new(Some(tx)),
            sink,
            tracker: tracker.clone(),
            threads_done: Mutex::new(vec![done_rx, checkpoints_done_rx]),
        })
    }

    fn submit(&self, op: WriteOp) -> BackplaneResult<()> {
        let guard = lock(&self.tx);
        let tx = guard.as_ref().ok_or(BackplaneError::Closed)?;
        tx.try_send(op).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BackplaneError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => BackplaneError::Closed,
        })
    }
}

impl Backplane for EmbeddedBackplane {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn append(
        &self,
        doc: &DocId,
        update: Bytes,
        reach: Option<Reach>,
        origin: Option<Origin>,
    ) -> BoxFuture<'static, BackplaneResult<Position>> {
        let (reply, rx) = oneshot::channel();
        answer(
            self.submit(WriteOp::Append {
                doc: doc.clone(),
                update,
                reach,
                origin,
                reply,
            }),
            rx,
        )
    }

    fn read_after(
        &self,
        doc: &DocId,
        after: StreamId,
    ) -> BoxFuture<'static, BackplaneResult<(LogHead, Vec<Entry>)>> {
        let shared = self.shared.clone();
        let doc = doc.clone();
        let task = self
            .tracker
            .spawn_blocking(move || read_after(&shared, &doc, after));
        async move { task.await.map_err(storage)? }.boxed()
    }

    /// Every append is delivered by this process, so the head is exact: an id past it cannot
    /// exist yet (whatever the clock says; ids here never go backwards, even when it does).
    fn may_hold(&self, doc: &DocId, id: StreamId) -> BoxFuture<'static, bool> {
        let shared = self.shared.clone();
        let doc = doc.clone();
        let task = self.tracker.spawn_blocking(move || {
            let head = {
                let p = lock(&shared.pending);
                match p.docs.get(&doc) {
                    Some(d) => Some(d.head),
                    None => shared
                        .db
                        .begin_read()
                        .ok()
                        .and_then(|txn| head_in(&txn, &doc).ok().flatten()),
                }
            };
            head.is_some_and(|h| id <= h.last)
        });
        async move { task.await.unwrap_or(false) }.boxed()
    }

    fn trim(&self, doc: &DocId, before: StreamId) -> BoxFuture<'static, BackplaneResult<()>> {
        let (reply, rx) = oneshot::channel();
        answer(
            self.submit(WriteOp::Trim {
                doc: doc.clone(),
                before,
                reply,
            }),
            rx,
        )
    }

    fn attach(&self, sink: Weak<dyn EntrySink>) {
        let _ = self.sink.set(sink);
    }

    // Every append is delivered to the sink, which routes by document: nothing to track.
    fn watch(&self, _doc: &DocId, _after: StreamId) {}

    fn unwatch(&self, _doc: &DocId) {}

    fn enable_webhooks(
        &self,
    ) -> BackplaneResult<Arc<dyn crate::backplane::webhook_store::WebhookStore>> {
        self.enable_hooks()
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        // Dropping the sender lets the writer finish what was admitted, checkpoint, then stop.
        lock(&self.tx).take();
        let done = std::mem::take(&mut *lock(&self.threads_done));
        async move {
            for done in done {
                let _ = done.await;
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::NO_LOG;

    struct Collect(Mutex<Vec<(String, Vec<StreamId>)>>);
    impl EntrySink for Collect {
        fn deliver(&self, doc: &DocId, _epoch: u64, entries: Vec<Entry>) {
            lock(&self.0).push((doc.to_string(), entries.iter().map(|e| e.id).collect()));
        }
    }

    #[tokio::test]
    async fn append_read_trim_and_reopen() {
        let (_dir, path) = scratch();
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let epoch;
        let mut ids = Vec::new();
        {
            let bp = EmbeddedBackplane::open(&path, 1 << 20, &tracker).expect("open");
            let collect = Arc::new(Collect(Mutex::new(Vec::new())));
            let sink: Arc<dyn EntrySink> = collect.clone();
            bp.attach(Arc::downgrade(&sink));
            let (head, none) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
            assert_eq!(
                (head, none.len()),
                (NO_LOG, 0),
                "no log before the first append"
            );
            let mut first = None;
            for i in 0..5u8 {
                let origin = Origin {
                    node: 1,
                    conn: 2,
                    seq: Some(u64::from(i)),
                    chain: 0,
                };
                let p = bp
                    .append(&doc, Bytes::from(vec![i]), None, Some(origin))
                    .await
                    .expect("append");
                assert_eq!(*first.get_or_insert(p.epoch), p.epoch);
                ids.push(p.id);
            }
            epoch = first.unwrap_or_default();
            assert_ne!(epoch, 0);
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
            let (head, entries) = bp.read_after(&doc, ids[1]).await.expect("read");
            assert_eq!(head.last, ids[4]);
            assert_eq!(
                entries.iter().map(|e| e.id).collect::<Vec<_>>(),
                ids[2..].to_vec()
            );
            assert_eq!(entries[0].update.as_ref(), &[2]);
            assert_eq!(entries[0].origin.and_then(|o| o.seq), Some(2));
            bp.trim(&doc, ids[2]).await.expect("trim");
            let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
            assert_eq!(head.floor, ids[1]);
            assert_eq!(entries.len(), 3);
            assert!(head.holds_after(ids[1]));
            assert!(!head.holds_after(ids[0]));
            bp.close().await;
            let delivered: usize = lock(&collect.0).iter().map(|(_, v)| v.len()).sum();
            assert_eq!(delivered, 5);
        }
        let bp = EmbeddedBackplane::open(&path, 1 << 20, &tracker).expect("reopen");
        let (head, _) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(head.epoch, epoch, "epoch survives a restart");
        assert_eq!(head.last, ids[4]);
        let next = bp
            .append(&doc, Bytes::from_static(b"x"), None, None)
            .await
            .expect("append");
        assert!(next.id > ids[4]);
        bp.close().await;
    }

    pub(super) fn entry_ids(entries: &[Entry]) -> Vec<StreamId> {
        entries.iter().map(|e| e.id).collect()
    }

    /// No checkpoint on the timer within a test: entries stay pending until a close (or the
    /// size trigger).
    pub(super) const NEVER: Duration = Duration::from_secs(3600);

    /// A fresh directory and the path of a log in it.
    pub(super) fn scratch() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        (dir, path)
    }

    pub(super) async fn append_n(bp: &EmbeddedBackplane, doc: &DocId, n: u8) -> Vec<StreamId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let p = bp
                .append(doc, Bytes::from(vec![i; 3]), None, None)
                .await
                .expect("append");
            ids.push(p.id);
        }
        ids
    }

    /// Copies the log and its write-ahead segments as they are on disk right now: what a
    /// `kill -9` (or a power cut, everything acknowledged having been fsynced) leaves.
    pub(super) fn crash_image(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }

    // Stays whole: one scenario, each step reading the log the step before it left.
    #[tokio::test]
    async fn pending_entries_and_trims_read_and_replay_like_checkpointed_ones() {
        let (dir, path) = scratch();
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let other = DocId::parse("other").expect("doc id");

        // Older entries reach redb at close.
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("open");
        let older = append_n(&bp, &doc, 4).await;
        let epoch = bp
            .read_after(&doc, StreamId::ZERO)
            .await
            .expect("read")
            .0
            .epoch;
        bp.close().await;
        drop(bp);
        assert!(
            wal::list_segments(&path).expect("list").is_empty(),
            "a clean close leaves nothing to replay"
        );

        // Newer ones wait in the write-ahead segment, and so does a trim of some of both.
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("reopen");
        let newer = append_n(&bp, &doc, 4).await;
        let other_ids = append_n(&bp, &other, 2).await;
        bp.trim(&doc, newer[1]).await.expect("trim");
        assert!(
            !lock(&bp.shared.pending).docs.is_empty(),
            "nothing was checkpointed yet"
        );
        let expect = |head: LogHead, entries: &[Entry]| {
            assert_eq!(head.epoch, epoch);
            assert_eq!(
                head.floor, newer[0],
                "the newest trimmed entry, from the pending ones"
            );
            assert_eq!(head.last, newer[3]);
            assert_eq!(entry_ids(entries), newer[1..].to_vec());
            assert_eq!(entries[0].update.as_ref(), &[1, 1, 1]);
        };
        let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        expect(head, &entries);
        let (_, after) = bp.read_after(&doc, newer[2]).await.expect("read");
        assert_eq!(entry_ids(&after), vec![newer[3]]);
        assert!(older[3] < newer[0]);

        // What a crash leaves now replays to the same log.
        let crashed = tempfile::tempdir().expect("tempdir");
        crash_image(dir.path(), crashed.path());
        bp.close().await;
        drop(bp);
        let copy = EmbeddedBackplane::open_with(
            &crashed.path().join("log.redb"),
            1 << 20,
            &tracker,
            NEVER,
        )
        .expect("open the crash image");
        assert!(
            wal::list_segments(&crashed.path().join("log.redb"))
                .expect("list")
                .len()
                == 1,
            "replayed segments are gone; only the new, empty one is left"
        );
        let (head, entries) = copy.read_after(&doc, StreamId::ZERO).await.expect("read");
        expect(head, &entries);
        let (other_head, other_entries) =
            copy.read_after(&other, StreamId::ZERO).await.expect("read");
        assert_eq!(entry_ids(&other_entries), other_ids);
        assert_eq!(other_head.last, other_ids[1]);
        let next = copy
            .append(&doc, Bytes::from_static(b"n"), None, None)
            .await
            .expect("append");
        assert!(next.id > newer[3] && next.epoch == epoch);
        copy.close().await;

        // And the cleanly closed original reads the same from redb alone.
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("reopen");
        let (head, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        expect(head, &entries);
        bp.close().await;
    }

    /// The pending set keeps where an entry lies, not its bytes: reads take them from the
    /// segment, checked, and a handle taken before a checkpoint still reads once it is gone.
    #[tokio::test]
    async fn a_pending_entry_is_read_from_its_segment() {
        use std::os::unix::fs::FileExt;
        let (_dir, path) = scratch();
        let tracker = TaskTracker::new();
        let doc = DocId::parse("d").expect("doc id");
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("open");
        let ids = append_n(&bp, &doc, 3).await;
        let (file, second) = {
            let p = lock(&bp.shared.pending);
            p.locate(&p.docs[&doc].entries[1]).expect("its segment")
        };
        let (_, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(entry_ids(&entries), ids);
        assert_eq!(entries[1].update.as_ref(), &[1, 1, 1]);

        // One byte of the second entry's update, changed on disk, fails the read that
        // includes it, and only that one.
        let last = second.span.at + u64::from(second.span.len) - 1;
        let segment = wal::segment_path(&path, second.seg);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .expect("open segment");
        f.write_all_at(&[9], last).expect("damage");
        let err = bp.read_after(&doc, StreamId::ZERO).await.err();
        assert!(
            matches!(&err, Some(BackplaneError::Storage(m)) if m.contains("write-ahead segment")),
            "{err:?}"
        );
        let (_, tail) = bp.read_after(&doc, ids[1]).await.expect("read past it");
        assert_eq!(entry_ids(&tail), ids[2..].to_vec());
        f.write_all_at(&[1], last).expect("repair");

        // The close checkpoints the entries from the segment and deletes it; the handle taken
        // before still reads it.
        bp.close().await;
        drop(bp);
        assert!(!segment.exists());
        let value = shared::read_stored(&file, &second).expect("read through the handle");
        assert_eq!(&value[value.len() - 3..], &[1, 1, 1]);
        let bp = EmbeddedBackplane::open_with(&path, 1 << 20, &tracker, NEVER).expect("reopen");
        let (_, entries) = bp.read_after(&doc, StreamId::ZERO).await.expect("read");
        assert_eq!(entry_ids(&entries), ids);
        assert_eq!(entries[1].update.as_ref(), &[1, 1, 1]);
        bp.close().await;
    }
}
