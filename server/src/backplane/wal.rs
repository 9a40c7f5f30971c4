//! The embedded log's write-ahead file (data-flow step 4): a group of appends is one write and one fdatasync here before it is acknowledged; redb takes the entries later, in bulk.
//!
//! A segment is a header (magic, the id of the redb file it belongs to, and a cut: see
//! below) followed by groups, each one write and one fdatasync: `GROUP_MAGIC u32 | len u32 |
//! records`, a record being `len u32 | crc32 u32 | body`. The header's id keeps a segment
//! from ever being replayed into another database (a log file deleted or restored from a
//! backup beside a left-over segment).
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

use super::LogHead;
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::{DocId, StreamId};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CHWAL\0\0\x02";
/// Segments an earlier version wrote: a 16-byte header (no cut) and records without groups.
const MAGIC_V1: &[u8; 8] = b"CHWAL\0\0\x01";
const HEADER_V1: usize = 16;
/// Magic, database id, cut segment number (0: none), cut length.
const HEADER: u64 = 32;
const RECORD_HEADER: usize = 8;
/// Not ASCII and not a small number, so neither text nor zeros look like a group.
const GROUP_MAGIC: [u8; 4] = [0xc7, 0x1a, 0xe5, 0x93];
const GROUP_HEADER: usize = 8;
/// A record can hold the largest update a node accepts, with room to spare; a length above
/// this is a torn or foreign tail, not a record.
const MAX_RECORD: usize = 1 << 30;

const KIND_APPEND: u8 = 1;
const KIND_TRIM: u8 = 2;
const KIND_HEAD: u8 = 3;

/// What one record says happened to a document. Each carries the document's head after it,
/// so replay restores the metadata without reading anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An entry with id `head.last`; `value` is the log table's row (origin header + update).
    Append {
        doc: DocId,
        head: LogHead,
        value: Bytes,
    },
    /// Entries below `before` were removed.
    Trim {
        doc: DocId,
        head: LogHead,
        before: StreamId,
    },
    /// A new log (a first open): its epoch must survive before anyone is told it.
    Head { doc: DocId, head: LogHead },
}

impl Record {
    pub fn doc(&self) -> &DocId {
        match self {
            Record::Append { doc, .. } | Record::Trim { doc, .. } | Record::Head { doc, .. } => doc,
        }
    }

    pub fn head(&self) -> LogHead {
        match self {
            Record::Append { head, .. } | Record::Trim { head, .. } | Record::Head { head, .. } => {
                *head
            }
        }
    }

    /// Appends this record, framed, to `buf`.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u32_le(0);
        buf.put_u32_le(0);
        let (kind, doc, head) = match self {
            Record::Append { doc, head, .. } => (KIND_APPEND, doc, head),
            Record::Trim { doc, head, .. } => (KIND_TRIM, doc, head),
            Record::Head { doc, head } => (KIND_HEAD, doc, head),
        };
        buf.put_u8(kind);
        let name = doc.as_str().as_bytes();
        buf.put_u16_le(name.len() as u16);
        buf.put_slice(name);
        for v in [
            head.epoch,
            head.last.ms,
            head.last.seq,
            head.floor.ms,
            head.floor.seq,
        ] {
            buf.put_u64_le(v);
        }
        match self {
            Record::Append { value, .. } => buf.put_slice(value),
            Record::Trim { before, .. } => {
                buf.put_u64_le(before.ms);
                buf.put_u64_le(before.seq);
            }
            Record::Head { .. } => {}
        }
        let body = start + RECORD_HEADER;
        let len = (buf.len() - body) as u32;
        let crc = crc32fast::hash(&buf[body..]);
        buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        buf[start + 4..body].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(body: &[u8]) -> Option<Record> {
        let mut r = Cursor(body);
        let kind = r.u8()?;
        let name_len = usize::from(r.u16()?);
        let name = std::str::from_utf8(r.take(name_len)?).ok()?;
        let doc = DocId::parse(name).ok()?;
        let head = LogHead {
            epoch: r.u64()?,
            last: StreamId::new(r.u64()?, r.u64()?),
            floor: StreamId::new(r.u64()?, r.u64()?),
        };
        let record = match kind {
            KIND_APPEND => Record::Append {
                doc,
                head,
                value: Bytes::copy_from_slice(r.0),
            },
            KIND_TRIM => {
                let before = StreamId::new(r.u64()?, r.u64()?);
                r.end()?;
                Record::Trim { doc, head, before }
            }
            KIND_HEAD => {
                r.end()?;
                Record::Head { doc, head }
            }
            _ => return None,
        };
        Some(record)
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

/// `log.redb` → `log.redb.wal-0000000042`.
pub fn segment_path(base: &Path, seq: u64) -> PathBuf {
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".wal-{seq:010}"));
    base.with_file_name(name)
}

/// The segments beside `base`, oldest first.
pub fn list_segments(base: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = parent_dir(base);
    let prefix = format!(
        "{}.wal-",
        base.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((seq, entry.path()));
    }
    found.sort();
    Ok(found)
}

fn parent_dir(base: &Path) -> &Path {
    match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a new or removed directory entry survive a power loss.
pub fn sync_dir(base: &Path) -> io::Result<()> {
    File::open(parent_dir(base))?.sync_all()
}

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

/// Where a write that failed and could not be undone left segment `seq`: its acknowledged
/// bytes end at `len`, and what lies past it was never acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub seq: u64,
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Groups after a 32-byte header.
    Groups,
    /// Bare records after a 16-byte header (an earlier version).
    Records,
}

/// A segment as replay will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub seq: u64,
    pub path: PathBuf,
    pub what: Holds,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holds {
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
pub enum Skipped {
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
pub fn plan_replay(base: &Path, wal_id: u64) -> Result<Vec<Planned>, WalError> {
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
                    torn_bytes: (data.len() - whole_end) as u64,
                }
            }
        };
        planned.push(Planned { seq, path, what });
    }
    planned.reverse();
    Ok(planned)
}

/// The records a planned segment holds, oldest first.
pub fn read_planned(planned: &Planned) -> Result<Vec<Record>, WalError> {
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
    } else if at == data.len() {
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

/// The whole group (or, in the older format, record) at `at`: its records, and where the
/// next one starts.
fn unit_at(data: &[u8], at: usize, format: Format) -> Option<(Vec<Record>, usize)> {
    if format == Format::Records {
        let (record, next) = record_at(data, at)?;
        return Some((vec![record], next));
    }
    if data.get(at..at + 4)? != GROUP_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(data.get(at + 4..at + GROUP_HEADER)?.try_into().ok()?) as usize;
    let end = (at + GROUP_HEADER).checked_add(len)?;
    let group = data.get(..end)?;
    let mut records = Vec::new();
    let mut r = at + GROUP_HEADER;
    while r < end {
        let (record, next) = record_at(group, r)?;
        records.push(record);
        r = next;
    }
    // The writer never writes an empty group.
    (!records.is_empty()).then_some((records, end))
}

/// The whole record at `at` within `data`, and where the next one starts.
fn record_at(data: &[u8], at: usize) -> Option<(Record, usize)> {
    let header = data.get(at..at + RECORD_HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let body = data.get(at + RECORD_HEADER..at + RECORD_HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((Record::decode(body)?, at + RECORD_HEADER + len))
}

/// Records that go to disk with one write and one fdatasync: the unit a crash can tear.
pub struct Group {
    buf: BytesMut,
}

impl Default for Group {
    fn default() -> Self {
        let mut buf = BytesMut::with_capacity(4096);
        buf.put_slice(&GROUP_MAGIC);
        buf.put_u32_le(0);
        Group { buf }
    }
}

impl Group {
    pub fn push(&mut self, record: &Record) {
        record.encode_into(&mut self.buf);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == GROUP_HEADER
    }

    /// The group as it goes to disk.
    fn framed(&mut self) -> &[u8] {
        let len = (self.buf.len() - GROUP_HEADER) as u32;
        self.buf[4..GROUP_HEADER].copy_from_slice(&len.to_le_bytes());
        &self.buf
    }
}

/// The segment being appended to.
pub struct Segment {
    file: File,
    pub seq: u64,
    /// Bytes written and synced, header included.
    pub len: u64,
}

impl Segment {
    /// Creates segment `seq` for the database `wal_id`, carrying `cut` (an earlier segment a
    /// failed write left junk in); its header and directory entry are durable when this
    /// returns.
    pub fn create(base: &Path, seq: u64, wal_id: u64, cut: Option<Cut>) -> io::Result<Segment> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(base, seq))?;
        let mut header = BytesMut::with_capacity(HEADER as usize);
        header.put_slice(MAGIC);
        header.put_u64_le(wal_id);
        let cut = cut.unwrap_or(Cut { seq: 0, len: 0 });
        header.put_u64_le(cut.seq);
        header.put_u64_le(cut.len);
        file.write_all(&header)?;
        file.sync_all()?;
        sync_dir(base)?;
        Ok(Segment {
            file,
            seq,
            len: HEADER,
        })
    }

    /// Writes `group` and waits until it is on disk. On failure the segment is cut back to
    /// what was synced before, durably, so a later group never follows a half-written one; if
    /// even that fails the segment must not be written again (`poisoned` says where its
    /// acknowledged bytes end, for the next segment's header).
    pub fn append(&mut self, group: &mut Group) -> Result<(), AppendError> {
        let bytes = group.framed();
        let written = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                // Synced too: a cut the disk forgets would leave the failed group's bytes in
                // front of the next one, which replay would take for damage.
                let restored = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop))
                    .and_then(|()| self.file.sync_data());
                Err(AppendError {
                    error,
                    poisoned: restored.is_err().then_some(Cut {
                        seq: self.seq,
                        len: self.len,
                    }),
                })
            }
        }
    }
}

#[derive(Debug)]
pub struct AppendError {
    pub error: io::Error,
    /// Set when the segment could not be cut back and must not be written again.
    pub poisoned: Option<Cut>,
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn extend(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).expect("open");
        f.write_all(bytes).expect("write");
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
        extend(&segment_path(&base, 3), &[0; 4096]);
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
        assert_eq!(torn_bytes(&base), vec![last.len() as u64]);
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
        assert_eq!(
            torn_bytes(&base)[0],
            std::fs::metadata(&older).expect("meta").len() - starts[1]
        );
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
