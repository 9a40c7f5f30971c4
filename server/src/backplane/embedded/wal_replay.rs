//! Embedded log, recovery (at startup, before data-flow step 4 resumes): reads write-ahead segments back and tells a torn tail from damage.
//!
//! Replay tells a torn tail from damage. The writer starts a group only once the one before
//! it is on disk, so only the last group of the log can be half written by a crash (in any
//! state: cut short, zeros where the file grew, pages of it missing), and it was never
//! acknowledged: it is cut off. A bad group with a whole group anywhere after it (further in
//! its segment, found by scanning for the group magic, or in a later segment) was
//! acknowledged: the log is corrupt there, and replay fails with the file and offset instead
//! of skipping what the bad group held. A write that failed and could not be undone leaves
//! its segment with junk at the end; the next segment's header carries the cut (that
//! segment's number and where its acknowledged bytes end), so that junk is not mistaken for
//! damage.

use super::wal::{
    Cut, Format, HEADER, HEADER_V1, MAGIC, MAGIC_V1, Record, list_segments, parent_dir, unit_at,
};
use std::io;
use std::path::{Path, PathBuf};

/// Why the write-ahead log cannot be replayed. Either way the node must not start: what is
/// missing was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead segment {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "write-ahead segment {} is corrupt at byte {offset}: {damage}; acknowledged entries \
         would be lost, so the log is not opened (restore the file, or move it away to give \
         up what it holds)",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        damage: Damage,
    },
}

/// What is wrong at a corrupt offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("whole groups follow the bad one in the same segment")]
    GroupsFollow,
    #[error("later segments hold groups written after this one")]
    LaterSegmentsFollow,
    #[error("the bytes a later segment's header says were acknowledged do not read back")]
    CutPartDamaged,
    #[error("it does not start with a segment header, yet holds more than one")]
    NoHeader,
}

/// A segment as replay will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Planned {
    pub(super) seq: u64,
    pub(super) path: PathBuf,
    pub(super) what: Holds,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Holds {
    /// Written for another database (or created by a crash before its header was whole):
    /// nothing to replay.
    Nothing(Skipped),
    /// Whole groups in `whole`, then `torn_bytes` that were never acknowledged.
    Records {
        format: Format,
        whole: std::ops::Range<usize>,
        torn_bytes: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Skipped {
    OtherDatabase,
    /// A header cut short (or zeros where it should be) and nothing after it.
    UnfinishedHeader,
}

/// What a segment's first bytes say.
enum Header {
    Ours {
        format: Format,
        /// Where the groups start.
        start: usize,
        /// What the header says about an earlier segment.
        cut: Option<Cut>,
    },
    Skip(Skipped),
    /// Not a header, with more than a header's bytes.
    Unknown,
}

/// What follows the whole groups of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    Clean,
    /// Bad bytes from `at` with nothing whole after them in this segment: torn, if no later
    /// segment holds anything either.
    Torn {
        at: usize,
    },
    Damaged {
        at: usize,
        damage: Damage,
    },
}

fn read_file(path: &Path) -> Result<Vec<u8>, WalError> {
    std::fs::read(path).map_err(|source| WalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every segment beside `base` and decides what replay takes from each: all whole
/// groups, with the log's torn tail cut off. Fails if anything acknowledged is damaged.
pub(super) fn plan_replay(base: &Path, wal_id: u64) -> Result<Vec<Planned>, WalError> {
    let segments = list_segments(base).map_err(|source| WalError::Io {
        path: parent_dir(base).to_path_buf(),
        source,
    })?;
    // Newest first: a segment's fate depends on the cuts and the groups of later ones.
    let mut cuts: Vec<Cut> = Vec::new();
    let mut later_records = false;
    let mut planned = Vec::with_capacity(segments.len());
    for (seq, path) in segments.into_iter().rev() {
        let data = read_file(&path)?;
        let corrupt = |offset: usize, damage| WalError::Corrupt {
            path: path.clone(),
            offset: offset as u64,
            damage,
        };
        let what = match read_header(&data, wal_id) {
            Header::Skip(skipped) => Holds::Nothing(skipped),
            Header::Unknown => return Err(corrupt(0, Damage::NoHeader)),
            Header::Ours { format, start, cut } => {
                let limit = cuts.iter().find(|c| c.seq == seq).map(|c| c.len);
                let (whole_end, tail) = scan_groups(&data, format, start, limit);
                match tail {
                    Tail::Damaged { at, damage } => return Err(corrupt(at, damage)),
                    Tail::Torn { at } if later_records => {
                        return Err(corrupt(at, Damage::LaterSegmentsFollow));
                    }
                    Tail::Torn { .. } | Tail::Clean => {}
                }
                cuts.extend(cut);
                later_records |= whole_end > start;
                Holds::Records {
                    format,
                    whole: start..whole_end,
                    torn_bytes: torn_bytes(&data, whole_end),
                }
            }
        };
        planned.push(Planned { seq, path, what });
    }
    planned.reverse();
    Ok(planned)
}

/// The records a planned segment holds, oldest first.
pub(super) fn read_planned(planned: &Planned) -> Result<Vec<Record>, WalError> {
    let Holds::Records { format, whole, .. } = &planned.what else {
        return Ok(Vec::new());
    };
    let data = read_file(&planned.path)?;
    let mut records = Vec::new();
    let mut at = whole.start;
    while at < whole.end {
        // `None`: the file changed since it was planned.
        let (mut more, next) = unit_at(&data[..whole.end.min(data.len())], at, *format)
            .ok_or_else(|| WalError::Corrupt {
                path: planned.path.clone(),
                offset: at as u64,
                damage: Damage::GroupsFollow,
            })?;
        records.append(&mut more);
        at = next;
    }
    Ok(records)
}

fn read_header(data: &[u8], wal_id: u64) -> Header {
    let (format, start, cut) = if data.starts_with(MAGIC) && data.len() >= HEADER as usize {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let cut = (word(16) != 0).then(|| Cut {
            seq: word(16),
            len: word(24),
        });
        (Format::Groups, HEADER as usize, cut)
    } else if data.starts_with(MAGIC_V1) && data.len() >= HEADER_V1 {
        (Format::Records, HEADER_V1, None)
    } else if data.len() <= HEADER as usize && {
        let magic = &data[..data.len().min(8)];
        data.iter().all(|&b| b == 0) || MAGIC.starts_with(magic) || MAGIC_V1.starts_with(magic)
    } {
        // `Segment::create` syncs the header before anything is written after it: a crash
        // before that leaves a prefix of it, or zeros where the file grew.
        return Header::Skip(Skipped::UnfinishedHeader);
    } else {
        return Header::Unknown;
    };
    if data[8..16] != wal_id.to_le_bytes() {
        return Header::Skip(Skipped::OtherDatabase);
    }
    Header::Ours { format, start, cut }
}

/// Reads whole groups from `start` (up to `limit` when a later segment cut this one there):
/// where they end, and what follows them.
fn scan_groups(data: &[u8], format: Format, start: usize, limit: Option<u64>) -> (usize, Tail) {
    let end = limit.map_or(data.len(), |l| usize::try_from(l).unwrap_or(usize::MAX));
    let readable = &data[..end.min(data.len())];
    let mut at = start;
    while let Some((_, next)) = unit_at(readable, at, format) {
        at = next;
    }
    let tail = if limit.is_some() {
        // Everything before the cut was acknowledged (a cut past the end of the file means
        // acknowledged bytes are gone).
        if at < end {
            Tail::Damaged {
                at,
                damage: Damage::CutPartDamaged,
            }
        } else {
            Tail::Clean
        }
    } else if data[at..].iter().all(|&b| b == 0) {
        // The end of the groups, or zeros the segment grew by ahead of them (no group starts
        // with a zero byte): nothing was written there.
        Tail::Clean
    } else if (at + 1..data.len()).any(|o| unit_at(data, o, format).is_some()) {
        // The writer starts a group only once the one before is on disk: this one was.
        Tail::Damaged {
            at,
            damage: Damage::GroupsFollow,
        }
    } else {
        Tail::Torn { at }
    };
    (at, tail)
}

/// Bytes after the whole groups that are not the zeros a segment grows by.
fn torn_bytes(data: &[u8], whole_end: usize) -> u64 {
    let tail = &data[whole_end.min(data.len())..];
    let zeros = tail.iter().rev().take_while(|&&b| b == 0).count();
    (tail.len() - zeros) as u64
}

/// Where each whole group of the segment at `path` starts.
#[cfg(test)]
pub(super) fn group_starts(path: &Path) -> Vec<u64> {
    let data = std::fs::read(path).expect("read segment");
    let mut starts = Vec::new();
    let mut at = HEADER as usize;
    while let Some((_, next)) = unit_at(&data, at, Format::Groups) {
        starts.push(at as u64);
        at = next;
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::super::wal::{GROUP_HEADER, Group, RECORD_HEADER, Segment, segment_path};
    use super::*;
    use crate::backplane::LogHead;
    use bytes::{Bytes, BytesMut};
    use chorus_protocol::{DocId, StreamId};
    use std::fs::OpenOptions;

    fn head(last: u64) -> LogHead {
        LogHead {
            epoch: 7,
            last: StreamId::new(last, 1),
            floor: StreamId::new(2, 0),
        }
    }

    fn records() -> Vec<Record> {
        let doc = DocId::parse("room-1").expect("doc");
        vec![
            Record::Head {
                doc: doc.clone(),
                head: head(0),
            },
            Record::Append {
                doc: doc.clone(),
                head: head(5),
                value: Bytes::from_static(b"entry bytes"),
            },
            Record::Trim {
                doc,
                head: head(5),
                before: StreamId::new(4, 0),
            },
        ]
    }

    /// Writes segment `seq` with one group per element of `groups`; returns where each group
    /// starts and the segment's length.
    fn write_segment(
        base: &Path,
        seq: u64,
        cut: Option<Cut>,
        groups: &[&[Record]],
    ) -> (Vec<u64>, u64) {
        let mut seg = Segment::create(base, seq, ID, cut).expect("create");
        let mut starts = Vec::new();
        for records in groups {
            starts.push(seg.len);
            let mut group = Group::default();
            for r in *records {
                group.push(r);
            }
            seg.append(&mut group).expect("append");
        }
        (starts, seg.len)
    }

    const ID: u64 = 99;

    fn replayed(base: &Path) -> Result<Vec<Record>, WalError> {
        let mut out = Vec::new();
        for planned in plan_replay(base, ID)? {
            out.extend(read_planned(&planned)?);
        }
        Ok(out)
    }

    fn torn_bytes(base: &Path) -> Vec<u64> {
        plan_replay(base, ID)
            .expect("plan")
            .iter()
            .map(|p| match p.what {
                Holds::Records { torn_bytes, .. } => torn_bytes,
                Holds::Nothing(_) => 0,
            })
            .collect()
    }

    fn flip(path: &Path, at: u64) {
        let mut data = std::fs::read(path).expect("read");
        data[at as usize] ^= 0x40;
        std::fs::write(path, data).expect("write");
    }

    /// Where the segment's whole groups end (past them: the zeros it grew by ahead of them).
    fn data_end(path: &Path) -> u64 {
        let data = std::fs::read(path).expect("read");
        let mut at = HEADER as usize;
        while let Some((_, next)) = unit_at(&data, at, Format::Groups) {
            at = next;
        }
        at as u64
    }

    /// Writes `bytes` where the segment's bytes end, as the next write would (over the zeros
    /// it grew by, and past them if need be).
    fn extend(path: &Path, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let at = data_end(path);
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(bytes, at).expect("write");
    }

    /// A group's bytes as `Segment::append` writes them.
    fn framed(records: &[Record]) -> Vec<u8> {
        let mut group = Group::default();
        for r in records {
            group.push(r);
        }
        group.framed().to_vec()
    }

    fn expect_corrupt(result: Result<Vec<Record>, WalError>, path: &Path, at: u64, why: Damage) {
        match result {
            Err(WalError::Corrupt {
                path: p,
                offset,
                damage,
            }) => {
                assert_eq!((p.as_path(), offset, damage), (path, at, why));
                let message = WalError::Corrupt {
                    path: p,
                    offset,
                    damage,
                }
                .to_string();
                assert!(
                    message.contains(&path.display().to_string())
                        && message.contains(&format!("byte {at}")),
                    "{message}"
                );
            }
            other => panic!("expected corruption at {at} ({why:?}), got {other:?}"),
        }
    }

    #[test]
    fn records_read_back_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let all = records();
        write_segment(&base, 3, None, &[&all[..2], &all[2..]]);
        assert_eq!(replayed(&base).expect("replay"), all);
        assert_eq!(torn_bytes(&base), vec![0]);

        // A third group that reached the disk only in part.
        let third = framed(&all[1..]);
        let half = third.len() / 2;
        extend(&segment_path(&base, 3), &third[..half]);
        assert_eq!(replayed(&base).expect("replay"), all);
        assert_eq!(torn_bytes(&base), vec![half as u64]);

        // And the file grew past it with zeros (its size reached the disk, its pages did not).
        let path = segment_path(&base, 3);
        let len = std::fs::metadata(&path).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len + 4096).expect("grow");
        assert_eq!(replayed(&base).expect("replay"), all, "zeros are not data");
    }

    #[test]
    fn a_last_group_with_pages_missing_is_a_torn_tail() {
        // The pages of the group being written reach the disk in any order: its first record
        // lost, a later one whole. Still one group, never acknowledged.
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let all = records();
        let path = segment_path(&base, 1);
        let (_, len) = write_segment(&base, 1, None, &[&all[..1]]);
        let mut last = framed(&all);
        for b in &mut last[GROUP_HEADER..GROUP_HEADER + 20] {
            *b = 0;
        }
        extend(&path, &last);
        assert_eq!(replayed(&base).expect("replay"), all[..1].to_vec());
        // Counted up to its last non-zero byte: trailing zeros of a torn group look like the
        // zeros the segment grew by (and neither is data).
        let torn = torn_bytes(&base)[0];
        assert!(torn > 0 && torn <= last.len() as u64, "{torn}");
        // Its header lost too.
        for b in &mut last[..GROUP_HEADER] {
            *b = 0;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(len))
            .expect("cut");
        extend(&path, &last);
        assert_eq!(replayed(&base).expect("replay"), all[..1].to_vec());
    }

    #[test]
    fn a_flipped_byte_in_a_middle_group_fails_with_the_file_and_offset() {
        let all = records();
        // In a record's body, in a record's length, in the group's magic, in its length.
        let first_record_len = framed(&all[1..2]).len() as u64 - GROUP_HEADER as u64;
        for within in [
            GROUP_HEADER as u64 + RECORD_HEADER as u64 + 2,
            GROUP_HEADER as u64 + first_record_len + 1,
            1,
            5,
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = dir.path().join("log.redb");
            let path = segment_path(&base, 1);
            let (starts, _) = write_segment(&base, 1, None, &[&all[..1], &all[1..], &all[..1]]);
            flip(&path, starts[1] + within);
            expect_corrupt(replayed(&base), &path, starts[1], Damage::GroupsFollow);
        }
    }

    #[test]
    fn damage_in_an_older_segment_fails() {
        let all = records();
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let older = segment_path(&base, 1);
        let (starts, _) = write_segment(&base, 1, None, &[&all[..1], &all[1..]]);
        write_segment(&base, 2, None, &[&all[..1]]);
        assert_eq!(replayed(&base).expect("whole").len(), all.len() + 1);
        // Its last group: a tear would be fine in the newest segment, not before a later one.
        flip(&older, starts[1] + GROUP_HEADER as u64 + 12);
        expect_corrupt(
            replayed(&base),
            &older,
            starts[1],
            Damage::LaterSegmentsFollow,
        );
        // A newer segment holding nothing (started, then the crash) does not count.
        std::fs::remove_file(segment_path(&base, 2)).expect("rm");
        write_segment(&base, 2, None, &[]);
        assert_eq!(replayed(&base).expect("torn").len(), 1);
        let torn = torn_bytes(&base)[0];
        let group = framed(&all[1..]).len() as u64;
        assert!(torn > 0 && torn <= group, "{torn}");
    }

    #[test]
    fn segments_grow_in_zeroed_steps_that_replay_as_nothing_and_a_rotated_one_ends_where_its_successor_says()
     {
        use super::super::wal::PREALLOCATE;
        let all = records();
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let older = segment_path(&base, 1);
        let (starts, acked) = write_segment(&base, 1, None, &[&all[..1], &all[1..]]);
        let size = std::fs::metadata(&older).expect("meta").len();
        assert!(
            size >= PREALLOCATE && size > acked,
            "grown ahead of its groups ({size} bytes for {acked})"
        );
        assert_eq!(replayed(&base).expect("replay"), all);
        assert_eq!(
            torn_bytes(&base),
            vec![0],
            "the zeros it grew by are not torn"
        );
        // Rotation: the next segment's header records where this one ends.
        write_segment(&base, 2, Some(Cut { seq: 1, len: acked }), &[&all[..1]]);
        let mut expected = all.clone();
        expected.push(all[0].clone());
        assert_eq!(replayed(&base).expect("replay"), expected);
        assert_eq!(torn_bytes(&base), vec![0, 0]);
        // An acknowledged group of the older segment turned to zeros is damage, not the end.
        let f = OpenOptions::new().write(true).open(&older).expect("open");
        {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; (acked - starts[1]) as usize];
            f.write_all_at(&zeros, starts[1]).expect("zero");
        }
        expect_corrupt(replayed(&base), &older, starts[1], Damage::CutPartDamaged);
    }

    #[test]
    fn junk_a_failed_write_left_is_skipped_by_the_next_segments_cut() {
        let all = records();
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let older = segment_path(&base, 1);
        let (_, acked) = write_segment(&base, 1, None, &[&all[..1]]);
        // What the failed write left: a whole group (never acknowledged), then part of one.
        extend(&older, &framed(&all[1..]));
        extend(&older, &framed(&all)[..20]);
        let cut = Cut { seq: 1, len: acked };
        write_segment(&base, 2, Some(cut), &[&all[2..]]);
        let mut expected = all[..1].to_vec();
        expected.extend_from_slice(&all[2..]);
        assert_eq!(replayed(&base).expect("replay"), expected);
        // Without the cut the same bytes are damage: groups in the next segment follow them.
        std::fs::remove_file(segment_path(&base, 2)).expect("rm");
        write_segment(&base, 2, None, &[&all[2..]]);
        assert!(replayed(&base).is_err());
        // And damage before the cut is damage.
        std::fs::remove_file(segment_path(&base, 2)).expect("rm");
        write_segment(&base, 2, Some(cut), &[&all[2..]]);
        flip(&older, HEADER + GROUP_HEADER as u64 + 10);
        expect_corrupt(replayed(&base), &older, HEADER, Damage::CutPartDamaged);
    }

    #[test]
    fn a_segment_of_another_database_or_an_unfinished_one_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let mut seg = Segment::create(&base, 1, 5, None).expect("create");
        let mut group = Group::default();
        group.push(&records()[0]);
        seg.append(&mut group).expect("append");
        // A crash while segment 2 was being created.
        std::fs::write(segment_path(&base, 2), &MAGIC[..5]).expect("write");
        let planned = plan_replay(&base, 6).expect("plan");
        assert_eq!(
            planned.iter().map(|p| p.what.clone()).collect::<Vec<_>>(),
            vec![
                Holds::Nothing(Skipped::OtherDatabase),
                Holds::Nothing(Skipped::UnfinishedHeader)
            ]
        );
        // A header that is no header, with data after it, is damage.
        std::fs::write(segment_path(&base, 3), [7u8; 64]).expect("write");
        expect_corrupt(
            plan_replay(&base, 6).map(|_| Vec::new()),
            &segment_path(&base, 3),
            0,
            Damage::NoHeader,
        );
    }

    #[test]
    fn segments_of_the_earlier_format_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let path = segment_path(&base, 4);
        let mut data = MAGIC_V1.to_vec();
        data.extend(ID.to_le_bytes());
        let mut buf = BytesMut::new();
        for r in records() {
            r.encode_into(&mut buf);
        }
        data.extend_from_slice(&buf);
        data.extend_from_slice(&buf[..10]); // torn
        std::fs::write(&path, &data).expect("write");
        assert_eq!(replayed(&base).expect("replay"), records());
        assert_eq!(torn_bytes(&base), vec![10]);
        // A bad record with whole ones after it is damage there too.
        let second = HEADER_V1 as u64 + framed(&records()[..1]).len() as u64 - GROUP_HEADER as u64;
        flip(&path, second + RECORD_HEADER as u64 + 3);
        expect_corrupt(replayed(&base), &path, second, Damage::GroupsFollow);
    }
}
