//! The embedded log's write-ahead file (data-flow step 4): a group of appends is one write and one fdatasync here before it is acknowledged; redb takes the entries later, in bulk.
//!
//! A segment is a header (magic + the id of the redb file it belongs to) followed by records:
//! `len u32 | crc32 u32 | body`. A crash can leave the last group half written; that group was
//! never acknowledged, so reading stops at the first record whose length or checksum does not
//! hold. The header's id keeps a segment from ever being replayed into another database (a
//! log file deleted or restored from a backup beside a left-over segment).

use super::LogHead;
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::{DocId, StreamId};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CHWAL\0\0\x01";
const HEADER: u64 = 16;
const RECORD_HEADER: usize = 8;
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

/// What a segment holds, read back.
pub struct SegmentRead {
    /// `None` when the segment belongs to another database (or has no valid header).
    pub records: Option<Vec<Record>>,
    /// Bytes after the last whole record (a group cut short by a crash).
    pub torn_bytes: u64,
}

/// Reads every whole record of the segment at `path` that belongs to the database `wal_id`.
pub fn read_segment(path: &Path, wal_id: u64) -> io::Result<SegmentRead> {
    let data = std::fs::read(path)?;
    if data.len() < HEADER as usize || &data[..8] != MAGIC || data[8..16] != wal_id.to_le_bytes() {
        return Ok(SegmentRead {
            records: None,
            torn_bytes: 0,
        });
    }
    let mut records = Vec::new();
    let mut at = HEADER as usize;
    while data.len() - at >= RECORD_HEADER {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        let body = at + RECORD_HEADER;
        if len > MAX_RECORD || data.len() - body < len {
            break;
        }
        let bytes = &data[body..body + len];
        if crc32fast::hash(bytes) != crc {
            break;
        }
        let Some(record) = Record::decode(bytes) else {
            break;
        };
        records.push(record);
        at = body + len;
    }
    Ok(SegmentRead {
        records: Some(records),
        torn_bytes: (data.len() - at) as u64,
    })
}

/// The segment being appended to.
pub struct Segment {
    file: File,
    pub seq: u64,
    /// Bytes written and synced, header included.
    pub len: u64,
}

impl Segment {
    /// Creates segment `seq` for the database `wal_id`; its header and directory entry are
    /// durable when this returns.
    pub fn create(base: &Path, seq: u64, wal_id: u64) -> io::Result<Segment> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(base, seq))?;
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&wal_id.to_le_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        sync_dir(base)?;
        Ok(Segment {
            file,
            seq,
            len: HEADER,
        })
    }

    /// Writes `buf` and waits until it is on disk. On failure the segment is cut back to
    /// what was synced before, so a later group never follows a half-written one; if even
    /// that fails the segment must not be written again (`Err` with `poisoned`).
    pub fn append(&mut self, buf: &[u8]) -> Result<(), AppendError> {
        let written = self
            .file
            .write_all(buf)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(error) => {
                let restored = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop));
                Err(AppendError {
                    error,
                    poisoned: restored.is_err(),
                })
            }
        }
    }
}

#[derive(Debug)]
pub struct AppendError {
    pub error: io::Error,
    pub poisoned: bool,
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

    #[test]
    fn records_read_back_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let mut seg = Segment::create(&base, 3, 99).expect("create");
        let mut buf = BytesMut::new();
        for r in records() {
            r.encode_into(&mut buf);
        }
        seg.append(&buf).expect("append");
        let read = read_segment(&segment_path(&base, 3), 99).expect("read");
        assert_eq!(read.records, Some(records()));
        assert_eq!(read.torn_bytes, 0);

        // A second group that reached the disk only in part.
        let mut more = BytesMut::new();
        records()[1].encode_into(&mut more);
        let cut = more.len() - 3;
        seg.append(&more[..cut]).expect("append part");
        let read = read_segment(&segment_path(&base, 3), 99).expect("read");
        assert_eq!(read.records, Some(records()));
        assert_eq!(read.torn_bytes, cut as u64);
    }

    #[test]
    fn a_flipped_byte_ends_the_segment_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let mut seg = Segment::create(&base, 1, 5).expect("create");
        let mut buf = BytesMut::new();
        for r in records() {
            r.encode_into(&mut buf);
        }
        let first_len = {
            let mut one = BytesMut::new();
            records()[0].encode_into(&mut one);
            one.len()
        };
        buf[first_len + RECORD_HEADER + 2] ^= 0x40;
        seg.append(&buf).expect("append");
        let read = read_segment(&segment_path(&base, 1), 5).expect("read");
        assert_eq!(read.records, Some(records()[..1].to_vec()));
    }

    #[test]
    fn a_segment_of_another_database_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("log.redb");
        let mut seg = Segment::create(&base, 1, 5).expect("create");
        let mut buf = BytesMut::new();
        records()[0].encode_into(&mut buf);
        seg.append(&buf).expect("append");
        let read = read_segment(&segment_path(&base, 1), 6).expect("read");
        assert!(read.records.is_none());
        assert_eq!(
            list_segments(&base).expect("list"),
            vec![(1, segment_path(&base, 1))]
        );
    }
}
