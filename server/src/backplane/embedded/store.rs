//! Embedded log, redb side (data-flow steps 4–5): the tables, each document's head, reads and trims.

use super::shared::{Shared, read_stored};
use super::{lock, storage};
use crate::backplane::{BackplaneError, BackplaneResult, Entry, LogHead, Origin};
use bytes::{BufMut, Bytes};
use chorus_protocol::{DocId, StreamId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

/// (doc, ms, seq) → origin header + update bytes.
pub(super) const LOG: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("log");
/// doc → (epoch, last ms, last seq, floor ms, floor seq).
pub(super) const META: TableDefinition<&str, (u64, u64, u64, u64, u64)> =
    TableDefinition::new("meta");
/// "id" → the id every write-ahead segment of this database carries.
const WAL_ID: TableDefinition<&str, u64> = TableDefinition::new("wal");

const ORIGIN_HEADER: usize = 25;

pub(super) const NO_LOG: LogHead = LogHead::NONE;

/// Opens (or creates) the database at `path` with its tables, and returns it with the id its
/// write-ahead segments carry.
pub(super) fn open_db(path: &Path, cache_bytes: usize) -> BackplaneResult<(Database, u64)> {
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(storage)?;
    // Create the tables up front so readers never meet a missing table.
    let txn = db.begin_write().map_err(storage)?;
    let wal_id = {
        txn.open_table(LOG).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        let mut ids = txn.open_table(WAL_ID).map_err(storage)?;
        let existing = ids.get("id").map_err(storage)?.map(|v| v.value());
        match existing {
            Some(id) => id,
            None => {
                let id = rand::random::<u64>() | 1;
                ids.insert("id", id).map_err(storage)?;
                id
            }
        }
    };
    txn.commit().map_err(storage)?;
    Ok((db, wal_id))
}

pub(super) fn read_after(
    shared: &Shared,
    doc: &DocId,
    after: StreamId,
) -> BackplaneResult<(LogHead, Vec<Entry>)> {
    // redb's snapshot is taken while the pending set is held. A checkpoint removes entries
    // from the set only after redb committed them, so every entry is in one of the two (or
    // both, for a moment: the pending copy is then skipped below).
    let (pending, txn) = {
        let p = lock(&shared.pending);
        let pending = match p.docs.get(doc) {
            Some(d) => {
                let newer: Vec<_> = d
                    .entries
                    .iter()
                    .filter(|s| s.id > after)
                    .map(|s| p.locate(s))
                    .collect::<BackplaneResult<_>>()?;
                Some((d.head, newer))
            }
            None => None,
        };
        (pending, shared.db.begin_read().map_err(storage)?)
    };
    let head = match &pending {
        Some((h, _)) => *h,
        None => head_in(&txn, doc)?.unwrap_or(NO_LOG),
    };
    let log = txn.open_table(LOG).map_err(storage)?;
    // Entries at or below the floor are gone, even while redb still holds them (a trim that
    // waits for its checkpoint).
    let from = after.max(head.floor).successor();
    let mut entries = Vec::new();
    for row in log
        .range((doc.as_str(), from.ms, from.seq)..=(doc.as_str(), u64::MAX, u64::MAX))
        .map_err(storage)?
    {
        let (k, v) = row.map_err(storage)?;
        let (_, ms, seq) = k.value();
        let (origin, update) = decode_value(v.value())?;
        entries.push(Entry {
            id: StreamId::new(ms, seq),
            update,
            origin,
            reach: None,
        });
    }
    if let Some((_, newer)) = pending {
        let stored_last = entries.last().map(|e| e.id);
        for (file, s) in newer {
            if stored_last.is_some_and(|last| s.id <= last) {
                continue;
            }
            let (origin, update) = decode_value_bytes(read_stored(&file, &s)?)?;
            entries.push(Entry {
                id: s.id,
                update,
                origin,
                reach: None,
            });
        }
    }
    Ok((head, entries))
}

/// The head redb holds for `doc` in `txn`'s snapshot.
pub(super) fn head_in(
    txn: &redb::ReadTransaction,
    doc: &DocId,
) -> BackplaneResult<Option<LogHead>> {
    let meta = txn.open_table(META).map_err(storage)?;
    Ok(meta
        .get(doc.as_str())
        .map_err(storage)?
        .map(|v| head_from(v.value())))
}

/// The newest entry id below `before` that redb holds for `doc`.
pub(super) fn stored_newest_below(
    db: &Database,
    doc: &DocId,
    before: StreamId,
) -> BackplaneResult<Option<StreamId>> {
    let txn = db.begin_read().map_err(storage)?;
    let log = txn.open_table(LOG).map_err(storage)?;
    let newest = log
        .range((doc.as_str(), 0u64, 0u64)..(doc.as_str(), before.ms, before.seq))
        .map_err(storage)?
        .next_back()
        .transpose()
        .map_err(storage)?
        .map(|(k, _)| {
            let (_, ms, seq) = k.value();
            StreamId::new(ms, seq)
        });
    Ok(newest)
}

pub(super) fn head_from((epoch, lms, lseq, fms, fseq): (u64, u64, u64, u64, u64)) -> LogHead {
    LogHead {
        epoch,
        last: StreamId::new(lms, lseq),
        floor: StreamId::new(fms, fseq),
    }
}

pub(super) fn head_to(h: &LogHead) -> (u64, u64, u64, u64, u64) {
    (h.epoch, h.last.ms, h.last.seq, h.floor.ms, h.floor.seq)
}

/// Bytes of a log row holding `update`.
pub(super) fn value_len(update: &[u8]) -> usize {
    ORIGIN_HEADER + update.len()
}

/// Appends a log row (origin header, then the update) to `v`: the same bytes in redb and in a
/// write-ahead record.
pub(super) fn put_value(v: &mut impl BufMut, origin: Option<Origin>, update: &[u8]) {
    let flags = match origin {
        None => 0u8,
        Some(Origin { seq: None, .. }) => 1,
        Some(Origin { seq: Some(_), .. }) => 3,
    };
    let o = origin.unwrap_or(Origin {
        node: 0,
        conn: 0,
        seq: None,
        chain: 0,
    });
    v.put_u8(flags);
    v.put_u64_le(o.node);
    v.put_u64_le(o.conn);
    v.put_u64_le(o.seq.unwrap_or(0));
    v.put_slice(update);
}

pub(super) fn decode_value(v: &[u8]) -> BackplaneResult<(Option<Origin>, Bytes)> {
    Ok((
        decode_origin(v)?,
        Bytes::copy_from_slice(&v[ORIGIN_HEADER..]),
    ))
}

/// [`decode_value`] of a row already in its own buffer: the update is a slice of it.
pub(super) fn decode_value_bytes(v: Bytes) -> BackplaneResult<(Option<Origin>, Bytes)> {
    Ok((decode_origin(&v)?, v.slice(ORIGIN_HEADER..)))
}

fn decode_origin(v: &[u8]) -> BackplaneResult<Option<Origin>> {
    if v.len() < ORIGIN_HEADER {
        return Err(BackplaneError::Storage(
            "log entry shorter than its header".into(),
        ));
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let origin = match v[0] {
        0 => None,
        flags => Some(Origin {
            node: u64_at(1),
            conn: u64_at(9),
            seq: (flags & 2 != 0).then(|| u64_at(17)),
            chain: 0,
        }),
    };
    Ok(origin)
}

/// Removes entries below `before`; returns the id of the newest one removed.
pub(super) fn trim(
    log: &mut redb::Table<'_, (&'static str, u64, u64), &'static [u8]>,
    doc: &DocId,
    before: StreamId,
) -> BackplaneResult<Option<StreamId>> {
    let mut ids = Vec::new();
    for row in log
        .range((doc.as_str(), 0u64, 0u64)..(doc.as_str(), before.ms, before.seq))
        .map_err(storage)?
    {
        let (k, _) = row.map_err(storage)?;
        let (_, ms, seq) = k.value();
        ids.push(StreamId::new(ms, seq));
    }
    for id in &ids {
        log.remove((doc.as_str(), id.ms, id.seq)).map_err(storage)?;
    }
    Ok(ids.last().copied())
}
