//! Redis backplane, wire format (data-flow steps 4–5): replies parsed to entries; the origin field.

use crate::backplane::{BackplaneError, BackplaneResult, Entry, LogHead, Origin};
use bytes::{BufMut, Bytes, BytesMut};
use chorus_protocol::StreamId;
use redis::Value;
use std::collections::HashMap;

/// Origin as 25 bytes (flags, node, conn, seq), or empty for none.
pub(super) fn encode_origin(origin: Option<Origin>) -> Vec<u8> {
    let Some(o) = origin else {
        return Vec::new();
    };
    let mut v = BytesMut::with_capacity(25);
    v.put_u8(if o.seq.is_some() { 3 } else { 1 });
    v.put_u64_le(o.node);
    v.put_u64_le(o.conn);
    v.put_u64_le(o.seq.unwrap_or(0));
    v.to_vec()
}

fn decode_origin(v: &[u8]) -> Option<Origin> {
    if v.len() != 25 {
        return None;
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Some(Origin {
        node: u64_at(1),
        conn: u64_at(9),
        seq: (v[0] & 2 != 0).then(|| u64_at(17)),
        chain: 0,
    })
}

pub(super) fn parse_stream_id(s: &str) -> Option<StreamId> {
    let (ms, seq) = s.split_once('-')?;
    Some(StreamId::new(ms.parse().ok()?, seq.parse().ok()?))
}

fn bad(what: &str) -> BackplaneError {
    BackplaneError::Storage(format!("unexpected redis reply: {what}"))
}

pub(super) fn as_array(v: Value) -> BackplaneResult<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        other => Err(bad(&format!("expected an array, got {other:?}"))),
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

pub(super) fn as_string(v: Option<&Value>) -> Option<String> {
    v.and_then(as_bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(super) fn as_u64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

pub(super) fn parse_u64(v: Option<&Value>) -> BackplaneResult<u64> {
    as_u64(v).ok_or_else(|| bad("expected a number"))
}

pub(super) fn parse_id(v: Option<&Value>) -> BackplaneResult<StreamId> {
    as_string(v)
        .as_deref()
        .and_then(parse_stream_id)
        .ok_or_else(|| bad("expected a stream id"))
}

type RawEntry = (String, HashMap<String, Vec<u8>>);

/// `[[id, [field, value, ...]], ...]` → entries with their fields.
fn parse_raw_entries(v: Value) -> BackplaneResult<Vec<RawEntry>> {
    let mut out = Vec::new();
    for e in as_array(v)? {
        let mut parts = as_array(e)?.into_iter();
        let id = as_string(parts.next().as_ref()).ok_or_else(|| bad("entry id"))?;
        let mut fields = HashMap::new();
        let kv = match parts.next() {
            Some(Value::Map(m)) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            Some(v) => as_array(v)?,
            None => Vec::new(),
        };
        let mut kv = kv.into_iter();
        while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
            if let (Some(k), Value::BulkString(v)) = (as_string(Some(&k)), v) {
                fields.insert(k, v);
            }
        }
        out.push((id, fields));
    }
    Ok(out)
}

pub(super) fn entry_from(id: &str, fields: &HashMap<String, Vec<u8>>) -> Option<(u64, Entry)> {
    let epoch = std::str::from_utf8(fields.get("e")?).ok()?.parse().ok()?;
    let update = Bytes::copy_from_slice(fields.get("u")?);
    let origin = fields.get("o").and_then(|o| decode_origin(o));
    Some((
        epoch,
        Entry {
            id: parse_stream_id(id)?,
            update,
            origin,
            reach: None,
        },
    ))
}

/// READ_LUA reply → the log's head and the entries after the cursor.
pub(super) fn parse_read(v: Value) -> BackplaneResult<(LogHead, Vec<Entry>)> {
    let mut parts = as_array(v)?.into_iter();
    let head = LogHead {
        epoch: parse_u64(parts.next().as_ref())?,
        floor: parse_id(parts.next().as_ref())?,
        last: parse_id(parts.next().as_ref())?,
    };
    let entries = match parts.next() {
        Some(v) => parse_entries(v)?
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>(),
        None => Vec::new(),
    };
    Ok((head, entries))
}

/// XRANGE reply → (epoch, entry) pairs.
fn parse_entries(v: Value) -> BackplaneResult<Vec<(u64, Entry)>> {
    Ok(parse_raw_entries(v)?
        .iter()
        .filter_map(|(id, f)| entry_from(id, f))
        .collect())
}

/// XREAD reply (RESP2 array or RESP3 map) → (key, entries) per stream that had any.
pub(super) fn parse_xread(v: Value) -> BackplaneResult<Vec<(String, Vec<RawEntry>)>> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m,
        other => as_array(other)?
            .into_iter()
            .filter_map(|s| {
                let mut p = as_array(s).ok()?.into_iter();
                Some((p.next()?, p.next()?))
            })
            .collect(),
    };
    streams
        .into_iter()
        .map(|(k, e)| {
            let key = as_string(Some(&k)).ok_or_else(|| bad("stream key"))?;
            Ok((key, parse_raw_entries(e)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_round_trip() {
        for o in [
            None,
            Some(Origin {
                node: 1,
                conn: 2,
                seq: Some(3),
                chain: 0,
            }),
            Some(Origin {
                node: u64::MAX,
                conn: 0,
                seq: None,
                chain: 0,
            }),
        ] {
            assert_eq!(decode_origin(&encode_origin(o)), o);
        }
    }
}
