//! Embedded log, write-ahead file (data-flow step 4): a group of appends is one write and one fdatasync here before it is acknowledged; redb takes the entries later, in bulk.
//!
//! This file holds the format and the writing; `wal_replay.rs` reads segments back. An append's
//! record is encoded straight into its group's buffer (`Group::push_append`), so the update is
//! copied once on its way to disk: into the bytes the group's one write takes.
//!
//! A segment is a header (magic, the id of the redb file it belongs to, and a cut: see
//! below) followed by groups, each one write and one fdatasync: `GROUP_MAGIC u32 | len u32 |
//! records`, a record being `len u32 | crc32 u32 | body`. The header's id keeps a segment
//! from ever being replayed into another database (a log file deleted or restored from a
//! backup beside a left-over segment).
//!
//! A segment grows in zeroed steps of [`PREALLOCATE`] ahead of its groups, so a group lands
//! inside the file and its fdatasync has no size change to journal. Replay stops at zeros
//! after the last group (no group starts with zero bytes); a segment that ended by rotation is
//! read exactly up to the length its successor's header records.

use super::store::put_value;
use crate::backplane::{LogHead, Origin};
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::{DocId, StreamId};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(super) const MAGIC: &[u8; 8] = b"CHWAL\0\0\x02";
/// Segments an earlier version wrote: a 16-byte header (no cut) and records without groups.
pub(super) const MAGIC_V1: &[u8; 8] = b"CHWAL\0\0\x01";
pub(super) const HEADER_V1: usize = 16;
/// Magic, database id, cut segment number (0: none), cut length.
pub(super) const HEADER: u64 = 32;
pub(super) const RECORD_HEADER: usize = 8;
/// Not ASCII and not a small number, so neither text nor zeros look like a group.
const GROUP_MAGIC: [u8; 4] = [0xc7, 0x1a, 0xe5, 0x93];
pub(super) const GROUP_HEADER: usize = 8;
/// A record can hold the largest update a node accepts, with room to spare; a length above
/// this is a torn or foreign tail, not a record.
const MAX_RECORD: usize = 1 << 30;

/// Zeroed bytes a segment grows by ahead of its groups. Measured on this machine (300-byte
/// writes, each followed by fdatasync): ~100 µs per fdatasync inside a zeroed file against
/// 140–240 µs when every write grows it; one step covers thousands of small groups.
pub(super) const PREALLOCATE: u64 = 1 << 20;

const KIND_APPEND: u8 = 1;
const KIND_TRIM: u8 = 2;
const KIND_HEAD: u8 = 3;

/// What one record says happened to a document. Each carries the document's head after it,
/// so replay restores the metadata without reading anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record {
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
    pub(super) fn doc(&self) -> &DocId {
        match self {
            Record::Append { doc, .. } | Record::Trim { doc, .. } | Record::Head { doc, .. } => doc,
        }
    }

    pub(super) fn head(&self) -> LogHead {
        match self {
            Record::Append { head, .. } | Record::Trim { head, .. } | Record::Head { head, .. } => {
                *head
            }
        }
    }

    /// Appends this record, framed, to `buf`.
    pub(super) fn encode_into(&self, buf: &mut BytesMut) -> Span {
        let (kind, doc, head) = match self {
            Record::Append { doc, head, .. } => (KIND_APPEND, doc, head),
            Record::Trim { doc, head, .. } => (KIND_TRIM, doc, head),
            Record::Head { doc, head } => (KIND_HEAD, doc, head),
        };
        frame_into(buf, kind, doc, head, |buf| match self {
            Record::Append { value, .. } => buf.put_slice(value),
            Record::Trim { before, .. } => {
                buf.put_u64_le(before.ms);
                buf.put_u64_le(before.seq);
            }
            Record::Head { .. } => {}
        })
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

/// Bytes a record takes besides its kind's own part (`Record::Append`'s value, a trim's id).
pub(super) fn record_overhead(doc: &DocId) -> usize {
    RECORD_HEADER + 1 + 2 + doc.as_str().len() + 5 * 8
}

/// Appends one framed record to `buf`: its header, kind, document and head, then what `rest`
/// writes, and the length and checksum of it all filled in last.
fn frame_into(
    buf: &mut BytesMut,
    kind: u8,
    doc: &DocId,
    head: &LogHead,
    rest: impl FnOnce(&mut BytesMut),
) -> Span {
    let start = buf.len();
    buf.put_u32_le(0);
    buf.put_u32_le(0);
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
    rest(buf);
    let body = start + RECORD_HEADER;
    let len = (buf.len() - body) as u32;
    let crc = crc32fast::hash(&buf[body..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..body].copy_from_slice(&crc.to_le_bytes());
    Span {
        at: start as u64,
        len: (buf.len() - start) as u32,
    }
}

/// Where a whole record (header included) lies: in a group's buffer, or in a segment once the
/// group is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) at: u64,
    pub(super) len: u32,
}

/// Reads back the append record at `span` of a segment and returns its value (the log table's
/// row), checked against the record's checksum: the pending set keeps only where an entry lies
/// (see `shared.rs`), so its bytes come from here, and a segment damaged since its write is an
/// error rather than a wrong entry.
pub(super) fn read_value(file: &File, span: Span) -> io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0; span.len as usize];
    file.read_exact_at(&mut data, span.at)?;
    let data = Bytes::from(data);
    let damaged = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("write-ahead record at {} does not read back", span.at),
        )
    };
    let header = data.get(..RECORD_HEADER).ok_or_else(damaged)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let body = &data[RECORD_HEADER..];
    if len != body.len() || crc32fast::hash(body) != crc || body.first() != Some(&KIND_APPEND) {
        return Err(damaged());
    }
    // Kind, name length, name, then the head's five u64s; the value is the rest.
    let name_len = usize::from(u16::from_le_bytes([
        *body.get(1).ok_or_else(damaged)?,
        *body.get(2).ok_or_else(damaged)?,
    ]));
    let value_at = RECORD_HEADER + 3 + name_len + 5 * 8;
    if value_at > data.len() {
        return Err(damaged());
    }
    Ok(data.slice(value_at..))
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
pub(super) fn segment_path(base: &Path, seq: u64) -> PathBuf {
    let mut name = base.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".wal-{seq:010}"));
    base.with_file_name(name)
}

/// The segments beside `base`, oldest first.
pub(super) fn list_segments(base: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
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

pub(super) fn parent_dir(base: &Path) -> &Path {
    match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a new or removed directory entry survive a power loss.
pub(super) fn sync_dir(base: &Path) -> io::Result<()> {
    File::open(parent_dir(base))?.sync_all()
}

/// Where a write that failed and could not be undone left segment `seq`: its acknowledged
/// bytes end at `len`, and what lies past it was never acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cut {
    pub(super) seq: u64,
    pub(super) len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// Groups after a 32-byte header.
    Groups,
    /// Bare records after a 16-byte header (an earlier version).
    Records,
}

/// The whole group (or, in the older format, record) at `at`: its records, and where the
/// next one starts.
pub(super) fn unit_at(data: &[u8], at: usize, format: Format) -> Option<(Vec<Record>, usize)> {
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
pub(super) struct Group {
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
    /// A group with room for `bytes` of records, so that it is not copied as it grows.
    pub(super) fn with_capacity(bytes: usize) -> Group {
        let mut group = Group::default();
        group.buf.reserve(bytes);
        group
    }

    pub(super) fn push(&mut self, record: &Record) {
        record.encode_into(&mut self.buf);
    }

    /// Appends the record of an entry with id `head.last` (what [`Record::Append`] holds), its
    /// value written straight into the group: the update is copied once, into the buffer the
    /// write takes, not into a value and then a record first.
    pub(super) fn push_append(
        &mut self,
        doc: &DocId,
        head: &LogHead,
        origin: Option<Origin>,
        update: &[u8],
    ) -> Span {
        frame_into(&mut self.buf, KIND_APPEND, doc, head, |buf| {
            put_value(buf, origin, update)
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.len() == GROUP_HEADER
    }

    /// The group as it goes to disk.
    pub(super) fn framed(&mut self) -> &[u8] {
        let len = (self.buf.len() - GROUP_HEADER) as u32;
        self.buf[4..GROUP_HEADER].copy_from_slice(&len.to_le_bytes());
        &self.buf
    }
}

/// The segment being appended to.
pub(super) struct Segment {
    file: File,
    /// The same file for readers of the entries it holds until they are checkpointed; the
    /// pending set keeps it (an unlinked segment stays readable through it).
    pub(super) reader: Arc<File>,
    pub(super) seq: u64,
    /// Bytes written and synced, header included.
    pub(super) len: u64,
    /// The file's length: zeros from `len` on.
    allocated: u64,
}

impl Segment {
    /// Creates segment `seq` for the database `wal_id`, carrying `cut` (an earlier segment a
    /// failed write left junk in); its header and directory entry are durable when this
    /// returns.
    pub(super) fn create(
        base: &Path,
        seq: u64,
        wal_id: u64,
        cut: Option<Cut>,
    ) -> io::Result<Segment> {
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
            reader: Arc::new(file.try_clone()?),
            file,
            seq,
            len: HEADER,
            allocated: HEADER,
        })
    }

    /// Makes the file at least `end` bytes long, zeros past what was written, growing it by
    /// [`PREALLOCATE`] steps. Not synced here: the next group's fdatasync carries it.
    fn reserve(&mut self, end: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        if end <= self.allocated {
            return Ok(());
        }
        let target = end.div_ceil(PREALLOCATE).saturating_mul(PREALLOCATE);
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.allocated = target;
        Ok(())
    }

    /// Writes `group` and waits until it is on disk. On failure the segment is cut back to
    /// what was synced before, durably, so a later group never follows a half-written one; if
    /// even that fails the segment must not be written again (`poisoned` says where its
    /// acknowledged bytes end, for the next segment's header).
    pub(super) fn append(&mut self, group: &mut Group) -> Result<(), AppendError> {
        use std::os::unix::fs::FileExt;
        let bytes = group.framed();
        let end = self.len + bytes.len() as u64;
        let written = self
            .reserve(end)
            .and_then(|()| self.file.write_all_at(bytes, self.len))
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                // Synced too: a cut the disk forgets would leave the failed group's bytes in
                // front of the next one, which replay would take for damage.
                self.allocated = self.len;
                let restored = self
                    .file
                    .set_len(self.len)
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
pub(super) struct AppendError {
    pub(super) error: io::Error,
    /// Set when the segment could not be cut back and must not be written again.
    pub(super) poisoned: Option<Cut>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::embedded::store::decode_value;

    #[test]
    fn an_entry_written_straight_into_its_group_reads_back_as_the_record() {
        let doc = DocId::parse("d").expect("doc id");
        let head = LogHead {
            epoch: 7,
            last: StreamId::new(5, 1),
            floor: StreamId::ZERO,
        };
        let origin = Some(Origin {
            node: 1,
            conn: 2,
            seq: Some(3),
            chain: 0,
        });
        let update = b"an update".as_slice();
        let mut direct = Group::with_capacity(0);
        direct.push_append(&doc, &head, origin, update);
        direct.push(&Record::Trim {
            doc: doc.clone(),
            head,
            before: StreamId::new(1, 0),
        });
        let mut value = Vec::new();
        put_value(&mut value, origin, update);
        let mut via_record = Group::default();
        via_record.push(&Record::Append {
            doc: doc.clone(),
            head,
            value: Bytes::from(value.clone()),
        });
        via_record.push(&Record::Trim {
            doc: doc.clone(),
            head,
            before: StreamId::new(1, 0),
        });
        let bytes = direct.framed().to_vec();
        assert_eq!(bytes, via_record.framed(), "the same bytes as before");
        let (records, end) = unit_at(&bytes, 0, Format::Groups).expect("a whole group");
        assert_eq!(end, bytes.len());
        let Record::Append { value: read, .. } = &records[0] else {
            panic!("an append first: {records:?}");
        };
        assert_eq!(read.as_ref(), value.as_slice());
        let (o, u) = decode_value(read).expect("a log row");
        assert_eq!(
            (o.map(|o| (o.node, o.conn, o.seq)), u.as_ref()),
            (Some((1, 2, Some(3))), update)
        );
        // What the writer reserves for a group is exactly what it writes.
        assert_eq!(
            bytes.len(),
            GROUP_HEADER + record_overhead(&doc) + value.len() + record_overhead(&doc) + 16
        );
    }
}
