//! Write path edge: walks a client's update (and state vector) exactly as yrs's decoder would,
//! without building anything, refusing what would crash or burden yrs and collecting the
//! update's [`Deps`].

use super::deps::{Block, Deps, Run};
use super::lib0::{Lib0Reader, read_client, read_id};
use super::{MAX_ANY_DEPTH, MAX_CLOCK, MAX_UPDATE_CLIENTS, Rejected, Scan};
use yrs::StateVector;
use yrs::updates::decoder::Decode;

/// Walks a lib0 v1 update the way `yrs::Update::decode_v1` does, without building anything,
/// and collects what the update builds on.
pub fn scan_update(update: &[u8]) -> Scan<Deps> {
    let mut r = Lib0Reader::new(update);
    let mut deps = Deps::default();
    let clients = r.count(3)?;
    if clients > MAX_UPDATE_CLIENTS {
        return Err(Rejected::TooManyClients(clients));
    }
    for _ in 0..clients {
        let blocks = r.count(2)?;
        let client = read_client(&mut r)?;
        let mut clock = r.var_u64()?;
        let need = clock;
        let first = deps.blocks.len();
        for _ in 0..blocks {
            let refs_from = deps.block_refs.len();
            let len = scan_block(&mut r, &mut deps)?;
            clock = clock.saturating_add(len);
            let refs = refs_from..deps.block_refs.len();
            deps.blocks.push(Block { end: clock, refs });
        }
        // yrs keeps clocks in u32 and adds block lengths unchecked: past 2^32 the clock wraps
        // and its block lookups index out of bounds (found by the `yjs_message` fuzz target).
        if clock > MAX_CLOCK {
            return Err(Rejected::Malformed("clock beyond 2^32"));
        }
        deps.runs.push(Run {
            client,
            need,
            end: clock,
            blocks: first..deps.blocks.len(),
        });
    }
    // delete set: clients × (client, ranges × (clock, len))
    let clients = r.count(2)?;
    if clients > MAX_UPDATE_CLIENTS {
        return Err(Rejected::TooManyClients(clients));
    }
    for _ in 0..clients {
        let client = read_client(&mut r)?;
        let ranges = r.count(2)?;
        for _ in 0..ranges {
            let clock = r.var_u64()?;
            let len = r.var_u64()?;
            if clock.saturating_add(len) > MAX_CLOCK {
                return Err(Rejected::Malformed("deleted range beyond 2^32"));
            }
            // yrs parks even an empty range of an unknown client as a pending deletion (found
            // by the `apply` fuzz target); no encoder writes one.
            if len == 0 {
                return Err(Rejected::Malformed("empty deleted range"));
            }
            deps.refer(client, clock.saturating_add(len - 1));
        }
    }
    deps.finish()
}

pub(super) const HAS_ORIGIN: u8 = 0b1000_0000;
pub(super) const HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
pub(super) const HAS_PARENT_SUB: u8 = 0b0010_0000;

/// One block: its length in clock units.
pub(super) fn scan_block(r: &mut Lib0Reader<'_>, deps: &mut Deps) -> Scan<u64> {
    let info = r.u8()?;
    match info {
        // GC: a length
        0 => return r.var_u64(),
        // A skip is a gap: the update was merged from pieces with one missing. yrs's
        // bookkeeping for integrated skips panics on crafted ones (an unchecked underflow and
        // an unwrap on a failed lookup, both found by the `yjs_message` fuzz target), and no
        // client of ours can be missing a piece: updates only go out once integrated.
        10 => {
            return Err(Rejected::Malformed(
                "updates with gaps (skip blocks) are not accepted",
            ));
        }
        _ => {}
    }
    if info & HAS_ORIGIN != 0 {
        let (client, clock) = read_id(r)?;
        deps.block_refs.push((client, clock));
    }
    if info & HAS_RIGHT_ORIGIN != 0 {
        let (client, clock) = read_id(r)?;
        deps.block_refs.push((client, clock));
    }
    let cant_copy_parent_info = info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0;
    if cant_copy_parent_info {
        if r.var_u64()? == 1 {
            r.string()?; // named root type
        } else {
            let (client, clock) = read_id(r)?; // parent item id
            deps.block_refs.push((client, clock));
        }
        if info & HAS_PARENT_SUB != 0 {
            r.string()?;
        }
    }
    content_len(r, info & 0b1111)
}

/// A block's content (`kind`: the low bits of its info byte), skipped: its length in clock
/// units as yrs counts them (strings in UTF-16 code units, `Any` per value).
fn content_len(r: &mut Lib0Reader<'_>, kind: u8) -> Scan<u64> {
    let len = match kind {
        1 => r.var_u64()?, // deleted length
        2 => {
            // Legacy ContentJSON. yrs 0.28 reads len+1 strings here but writes len, so such an
            // item does not survive re-encoding (the "pending poison" of reliability.md §2).
            // Neither Yjs 13 nor yrs produces it: refuse it outright.
            return Err(Rejected::Malformed("legacy JSON content is not accepted"));
        }
        3 => {
            r.buf()?;
            1
        }
        4 => r.string()?.encode_utf16().count() as u64,
        5 => {
            json_depth_ok(r.string()?)?; // embed
            1
        }
        6 => {
            r.string()?; // format key
            json_depth_ok(r.string()?)?;
            1
        }
        7 => {
            match r.u8()? {
                3 => {
                    r.string()?; // XmlElement name
                }
                0 | 1 | 2 | 4 | 5 | 6 | 9 | 15 => {}
                _ => return Err(Rejected::Malformed("unknown type reference")),
            }
            1
        }
        8 => {
            let n = r.count(1)?;
            for _ in 0..n {
                scan_any(r, 1)?;
            }
            n as u64
        }
        // A sub-document. yrs 0.28.1 never frees a document that holds one (or the update
        // that carried it): every trial apply leaked ~3 KB, found by the `yjs_message` fuzz
        // target under LeakSanitizer. Chorus syncs each document by its own id instead.
        9 => return Err(Rejected::Malformed("sub-documents are not supported")),
        _ => return Err(Rejected::Malformed("unknown content type")),
    };
    Ok(len)
}

fn scan_any(r: &mut Lib0Reader<'_>, depth: usize) -> Scan<()> {
    if depth > MAX_ANY_DEPTH {
        return Err(Rejected::TooDeep);
    }
    match r.u8()? {
        127 | 126 | 121 | 120 => Ok(()),
        125 => r.skip_var_i64(),
        124 => r.skip(4),
        123 | 122 => r.skip(8),
        119 => r.string().map(drop),
        118 => {
            let n = r.count(2)?;
            for _ in 0..n {
                r.string()?;
                scan_any(r, depth + 1)?;
            }
            Ok(())
        }
        117 => {
            let n = r.count(1)?;
            for _ in 0..n {
                scan_any(r, depth + 1)?;
            }
            Ok(())
        }
        116 => r.buf().map(drop),
        _ => Err(Rejected::Malformed("unknown value type")),
    }
}

/// yrs parses embed/format JSON with serde_json, whose own recursion limit (128) already turns
/// deep nesting into an error; we hold JSON to the same depth as binary values.
pub(super) fn json_depth_ok(s: &str) -> Scan<()> {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for b in s.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_ANY_DEPTH {
                    return Err(Rejected::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Decodes a client's state vector; the pre-check bounds the entry count by the input size.
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector, Rejected> {
    let mut r = Lib0Reader::new(bytes);
    let n = r.count(2)?;
    for _ in 0..n {
        read_client(&mut r)?;
        if r.var_u64()? > MAX_CLOCK {
            return Err(Rejected::Malformed("clock beyond 2^32"));
        }
    }
    StateVector::decode_v1(bytes).map_err(|_| Rejected::Malformed("state vector"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::testdata::*;
    use yrs::{Doc, ReadTxn, Transact};

    #[test]
    fn updates_over_the_client_limit_are_refused() {
        let max = MAX_UPDATE_CLIENTS as u64;
        scan_update(&wide_update(max, max)).expect("at the limit");
        let over = wide_update(max + 1, 0);
        assert_eq!(
            scan_update(&over).err(),
            Some(Rejected::TooManyClients(MAX_UPDATE_CLIENTS + 1))
        );
        assert_eq!(
            check(&over, 4 << 20).err(),
            Some(Rejected::TooManyClients(MAX_UPDATE_CLIENTS + 1)),
            "the write door refuses it before yrs decodes it"
        );
        assert_eq!(
            scan_update(&wide_update(1, max + 1)).err(),
            Some(Rejected::TooManyClients(MAX_UPDATE_CLIENTS + 1)),
            "deleted ranges count too"
        );
    }

    #[test]
    fn updates_with_gaps_are_refused() {
        // client 5, from clock 0: a GC block of 2, a skip of 3, then a GC block of 1.
        let u = [1, 3, 5, 0, 0, 2, 10, 3, 0, 1, 0];
        assert_eq!(
            scan_update(&u).err(),
            Some(Rejected::Malformed(
                "updates with gaps (skip blocks) are not accepted"
            ))
        );
    }

    #[test]
    fn clocks_past_u32_are_refused_before_yrs_wraps_them() {
        // Found by the `yjs_message` fuzz target: client 5 from clock 2^32 - 2, a GC block of
        // 4. yrs adds the lengths in u32, the clock wraps, and a later lookup indexes out of
        // bounds.
        let mut u = vec![1, 1, 5];
        let mut clock = u64::from(u32::MAX) - 1;
        while clock >= 0x80 {
            u.push((clock as u8 & 0x7f) | 0x80);
            clock >>= 7;
        }
        u.push(clock as u8);
        u.extend([0, 4, 0]);
        assert_eq!(
            scan_update(&u).err(),
            Some(Rejected::Malformed("clock beyond 2^32"))
        );
        // Client ids past 2^53 alias in yrs (found by the same target).
        assert_eq!(
            scan_update(&[
                1, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0, 1, 0
            ])
            .err(),
            Some(Rejected::Malformed("client id beyond 2^53"))
        );
        // A client listed twice, overlapping itself (found by the same target).
        assert_eq!(
            scan_update(&[2, 1, 5, 0, 0, 4, 1, 5, 2, 0, 4, 0]).err(),
            Some(Rejected::Malformed("a client is listed twice"))
        );
        // A block whose parent is itself (found by the `apply` target): its own run "covers"
        // the id, but yrs can never integrate it.
        let self_parent = [1, 1, 0, 0, 1, 0, 0, 0, 27, 0];
        let deps = scan_update(&self_parent).expect("well-formed");
        assert!(!deps.met_by(|_| 0));
        // An empty deleted range (found by the `apply` target: yrs parks it as pending).
        assert_eq!(
            scan_update(&[0, 1, 0, 1, 0, 0]).err(),
            Some(Rejected::Malformed("empty deleted range"))
        );
        // Sub-documents leak in yrs 0.28.1 (found by the `yjs_message` target).
        let with_subdoc = {
            use yrs::Map;
            let d = Doc::with_client_id(9);
            d.get_or_insert_map("m")
                .insert(&mut d.transact_mut(), "sub", Doc::new());
            d.transact()
                .encode_state_as_update_v1(&StateVector::default())
        };
        assert_eq!(
            scan_update(&with_subdoc).err(),
            Some(Rejected::Malformed("sub-documents are not supported"))
        );
        // A deleted range past 2^32 likewise.
        let ds = [0, 1, 5, 1, 0xfe, 0xff, 0xff, 0xff, 0x0f, 4];
        assert!(scan_update(&ds).is_err());
    }

    #[test]
    fn deep_nesting_is_rejected_before_yrs_sees_it() {
        // 6,240 levels aborts yrs 0.28.1 with a stack overflow; we never hand it over.
        assert_eq!(
            check(&nested_array_update(7_000), 1 << 20).err(),
            Some(Rejected::TooDeep)
        );
        assert_eq!(
            scan_update(&nested_array_update(MAX_ANY_DEPTH + 1)),
            Err(Rejected::TooDeep)
        );
        // Shallow nesting of the same shape is a real, applicable update.
        check(&nested_array_update(3), 1 << 20).expect("shallow nesting is fine");
    }
}
