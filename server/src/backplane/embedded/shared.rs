//! Embedded log, between the write and redb (data-flow steps 4–5): acknowledged changes redb does not hold yet, and the segment being written.

use super::wal::{self, Segment};
use crate::backplane::{BackplaneError, BackplaneResult, LogHead};
use bytes::Bytes;
use chorus_protocol::{DocId, StreamId};
use redb::Database;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an entry counts for in the pending set beyond its record's bytes.
pub(super) const ENTRY_OVERHEAD: usize = 96;

/// Acknowledged changes that redb does not hold yet, by document.
///
/// An entry here is where its record lies in a write-ahead segment, not its bytes: a burst of
/// large updates would otherwise hold everything written since the last checkpoint in the
/// node's memory (42 MB of 10 KB overwrites grew a node by twice the checkpoint trigger). The
/// bytes were just written, so reads and the checkpoint find them in the page cache.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) docs: HashMap<DocId, PendingDoc>,
    /// Record bytes (plus overhead) of every entry in `docs`: what waits for a checkpoint.
    pub(super) bytes: usize,
    /// A read handle on every segment an entry in `docs` lies in. A checkpoint forgets the
    /// entries before it deletes their segments, and a reader that took a handle still reads
    /// an unlinked segment through it.
    pub(super) segments: HashMap<u64, Arc<File>>,
}

/// An entry in the pending set: its id, and its record in segment `seg`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stored {
    pub(super) seg: u64,
    pub(super) id: StreamId,
    pub(super) span: wal::Span,
}

impl Pending {
    /// The entry at `s` with a handle to read its record through (outside the lock). Every
    /// pending entry's segment has one; an error, never a skipped entry, if not.
    pub(super) fn locate(&self, s: &Stored) -> BackplaneResult<(Arc<File>, Stored)> {
        match self.segments.get(&s.seg) {
            Some(f) => Ok((f.clone(), *s)),
            None => Err(BackplaneError::Storage(format!(
                "entry {} waits in write-ahead segment {}, which has no read handle",
                s.id, s.seg
            ))),
        }
    }
}

/// Reads the value (the log table's row) of a pending entry from its segment.
pub(super) fn read_stored(file: &File, s: &Stored) -> BackplaneResult<Bytes> {
    wal::read_value(file, s.span).map_err(|e| {
        BackplaneError::Storage(format!(
            "reading entry {} from write-ahead segment {}: {e}",
            s.id, s.seg
        ))
    })
}

pub(super) struct PendingDoc {
    /// The document's head as its newest change left it: authoritative over redb's row.
    pub(super) head: LogHead,
    /// The segment that holds the newest change to `head`.
    pub(super) head_seg: u64,
    /// Oldest first.
    pub(super) entries: VecDeque<Stored>,
    /// Trims redb has not applied yet, with their segments.
    pub(super) trims: Vec<(u64, StreamId)>,
}

/// What the writer, the checkpoint thread and readers share.
pub(super) struct Shared {
    pub(super) db: Database,
    pub(super) pending: Mutex<Pending>,
    /// The segment being written. Lock order: `active`, then `pending`.
    pub(super) active: Mutex<Active>,
    /// The write-ahead segments are named after the redb file.
    pub(super) base: PathBuf,
    /// Written in every segment's header, so segments only ever replay into this database.
    pub(super) wal_id: u64,
    pub(super) checkpoint_after: Duration,
    /// Webhooks are on: checkpoints mark the documents they write as undelivered (`hooks.rs`).
    pub(super) hooks_on: std::sync::atomic::AtomicBool,
    /// Documents the write-ahead replay at open wrote to, marked once webhooks are turned on.
    pub(super) replayed: Mutex<Vec<DocId>>,
}

pub(super) struct Active {
    /// `None` after a write failed and the segment could not be cut back, or once closed.
    pub(super) segment: Option<Segment>,
    pub(super) next_seq: u64,
    /// When the segment got its first record.
    pub(super) dirty_since: Option<Instant>,
    /// Where the acknowledged bytes of a segment a failed write left junk in end, until a new
    /// segment's header carries it.
    pub(super) cut: Option<wal::Cut>,
}

impl Active {
    /// Creates the next segment, carrying the pending cut, or else where the segment it
    /// follows ends (replay reads that one exactly that far: past it are only zeros it grew
    /// by). A number whose creation failed is not used again (its file may exist, unfinished).
    pub(super) fn start_segment(&mut self, base: &Path, wal_id: u64) -> std::io::Result<Segment> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ends = self.segment.as_ref().map(|s| wal::Cut {
            seq: s.seq,
            len: s.len,
        });
        let segment = Segment::create(base, seq, wal_id, self.cut.or(ends))?;
        self.cut = None;
        Ok(segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::embedded::wal::Record;
    use crate::backplane::embedded::wal_replay;

    #[test]
    fn a_pending_entry_without_its_segment_is_an_error_not_a_gap() {
        let s = Stored {
            seg: 3,
            id: StreamId::new(1, 0),
            span: wal::Span { at: 32, len: 10 },
        };
        assert!(matches!(
            Pending::default().locate(&s),
            Err(BackplaneError::Storage(m)) if m.contains("segment 3")
        ));
    }

    #[test]
    fn a_rotated_segment_is_read_exactly_as_far_as_its_successor_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let head = LogHead {
            epoch: 1,
            last: StreamId::new(1, 0),
            floor: StreamId::ZERO,
        };
        let mut active = Active {
            segment: None,
            next_seq: 1,
            dirty_since: None,
            cut: None,
        };
        let mut first = active.start_segment(&base, 7).expect("first segment");
        let mut group = wal::Group::default();
        group.push(&Record::Head {
            doc: DocId::parse("d").expect("doc id"),
            head,
        });
        first.append(&mut group).expect("append");
        let written = first.len;
        active.segment = Some(first);
        let second = active.start_segment(&base, 7).expect("rotate");
        active.segment = Some(second);
        assert_eq!(wal_replay::plan_replay(&base, 7).expect("plan").len(), 2);
        // Its group zeroed: without the recorded end it would read as the zeros it grew by.
        std::fs::OpenOptions::new()
            .write(true)
            .open(wal::segment_path(&base, 1))
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&vec![0; (written - wal::HEADER) as usize], wal::HEADER)
            })
            .expect("zero");
        assert!(matches!(
            wal_replay::plan_replay(&base, 7),
            Err(wal_replay::WalError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_segment_after_a_poisoned_one_carries_its_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let doc = DocId::parse("d").expect("doc id");
        let head = LogHead {
            epoch: 1,
            last: StreamId::new(1, 0),
            floor: StreamId::ZERO,
        };
        let mut seg = Segment::create(&base, 1, 7, None).expect("create");
        let mut records = wal::Group::default();
        records.push(&Record::Head { doc, head });
        seg.append(&mut records).expect("append");
        // What a write that failed and could not be cut back left behind it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(wal::segment_path(&base, 1))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"half a group"))
            .expect("junk");
        let mut active = Active {
            segment: None,
            next_seq: 2,
            dirty_since: None,
            cut: Some(wal::Cut {
                seq: 1,
                len: seg.len,
            }),
        };
        let next = active.start_segment(&base, 7).expect("next segment");
        assert_eq!((next.seq, active.next_seq, active.cut), (2, 3, None));
        let mut more = wal::Group::default();
        more.push(&Record::Head {
            doc: DocId::parse("e").expect("doc id"),
            head,
        });
        let mut next = next;
        next.append(&mut more).expect("append");
        let planned =
            wal_replay::plan_replay(&base, 7).expect("the junk is known not to be damage");
        assert_eq!(planned.len(), 2);
    }
}
