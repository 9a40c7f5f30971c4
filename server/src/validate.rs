//! Edge of the write path: every client-supplied update, state vector and awareness update is
//! checked here before yrs decodes it, so nothing that reaches the log can crash a node.
//!
//! Why a pre-scan: yrs 0.28.1 decodes `Any` values recursively with no depth limit (a ~12 KB
//! update of nested arrays overflows the stack, an abort `catch_unwind` cannot catch), and it
//! pre-allocates from attacker-chosen counts (a 4-byte state vector made it reserve ~500 MB).
//! `scan_update` walks the lib0 v1 update format exactly as `Update::decode_v1` does, with an
//! explicit nesting limit and every count checked against the bytes that remain. Then the
//! update is applied to a scratch document and re-encoded, which rejects updates after which a
//! document could no longer be encoded (see ../shared/research/reliability.md §2).
//!
//! What walks an update, per update, on the node whose client sent it: here, one scan and two
//! decodes (the trial: the update, then the scratch document's re-encoding, which is the check
//! that the document still encodes); in the owner, one decode to apply it (yrs's
//! `apply_update` consumes the decoded update, so the trial's copy cannot serve twice). The
//! owner also needs the clock each writer's blocks reach; it takes that from the [`Reach`] the
//! check put beside the bytes in the log entry rather than scanning again. Entries without one
//! are scanned by the owner: those read back from storage (a load, a catch-up), and every
//! entry of a Redis log, whose reader hands back new bytes from XREAD. Carrying it across Redis
//! would take a side table keyed by (epoch, id), filled when XADD answers, which races the
//! reader that may deliver the entry first; the scan it would save is ~0.2 µs of the ~1 µs the
//! owner spends applying a keystroke (`bench_validate`).

use bytes::Bytes;
use std::panic::{AssertUnwindSafe, catch_unwind};
use yrs::sync::awareness::AwarenessUpdate;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

/// Deepest nesting of `Any` arrays/maps accepted inside an update. Yjs documents built by
/// editors nest a handful of levels; 64 leaves room for JSON-ish app data while staying far
/// below the ~6,000 levels that overflow a 2 MiB stack.
pub const MAX_ANY_DEPTH: usize = 64;

/// Most yrs clients one update may carry blocks of (and, separately, deleted ranges of).
/// Every Yjs session that edits is one client, so a document accumulates clients over its
/// life and a full-state update (an offline client's first sync, an HTTP import) carries them
/// all: the limit sits far above what real documents reach. It bounds the per-client work and
/// state one message can cost (the dependency check is linear, but each client also grows
/// every node's state vector of the document for good); without it a 2 MiB update could
/// carry ~170k one-block clients.
pub const MAX_UPDATE_CLIENTS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("{0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("values nested deeper than {MAX_ANY_DEPTH} levels")]
    TooDeep,
    #[error("the document could not take this update: {0}")]
    Unapplicable(String),
    #[error("awareness state is not valid JSON")]
    BadJson,
    /// More clients with blocks, or with deleted ranges, than [`MAX_UPDATE_CLIENTS`].
    #[error("{0} clients in one update is over the limit of {MAX_UPDATE_CLIENTS}")]
    TooManyClients(usize),
}

/// A bounds-checked reader over lib0 encoding. Never allocates, never panics.
pub struct Lib0Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Scan<T> = Result<T, Rejected>;

impl<'a> Lib0Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Lib0Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn u8(&mut self) -> Scan<u8> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(Rejected::Malformed("unexpected end"))?;
        self.pos += 1;
        Ok(b)
    }

    pub fn skip(&mut self, n: usize) -> Scan<()> {
        if n > self.remaining() {
            return Err(Rejected::Malformed("length past the end"));
        }
        self.pos += n;
        Ok(())
    }

    /// Unsigned LEB128 as lib0 writes it; at most 64 bits.
    pub fn var_u64(&mut self) -> Scan<u64> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            if shift >= 64 || (shift == 63 && b & 0x7e != 0) {
                return Err(Rejected::Malformed("varint too long"));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// lib0's signed varint (sign in bit 6 of the first byte); only its length matters here.
    fn skip_var_i64(&mut self) -> Scan<()> {
        for _ in 0..10 {
            if self.u8()? & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(Rejected::Malformed("varint too long"))
    }

    /// A count of things each taking at least `min_bytes`: rejected if the rest of the input
    /// cannot hold that many, so no decoder downstream reserves memory for a lie.
    pub fn count(&mut self, min_bytes: usize) -> Scan<usize> {
        let n = self.var_u64()?;
        let fits = (self.remaining() / min_bytes.max(1)) as u64;
        if n > fits {
            return Err(Rejected::Malformed("count larger than the input can hold"));
        }
        Ok(n as usize)
    }

    /// `varUint8Array`: a length, then that many bytes.
    pub fn buf(&mut self) -> Scan<&'a [u8]> {
        let n = self.var_u64()?;
        if n > self.remaining() as u64 {
            return Err(Rejected::Malformed("length past the end"));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    pub fn string(&mut self) -> Scan<&'a str> {
        std::str::from_utf8(self.buf()?).map_err(|_| Rejected::Malformed("invalid UTF-8"))
    }
}

/// What an update needs from a document before yrs can integrate it.
///
/// yrs parks an update whose predecessors it has not seen in `pending`, forever, and re-merges
/// that set on every later update at superlinear cost (20k such updates: 47 s of CPU,
/// reliability.md §2). Every node replays the log, so one such update would burden them all.
/// The write path therefore only appends an update whose needs the document (plus the writer's
/// own earlier appends) already meets.
///
/// Ids the update refers to inside itself count only in the order yrs can integrate them: a
/// block whose origin or parent is itself, or a later block of a cycle, stays pending too
/// (found by the `apply` fuzz target), so [`Deps::met_by`] plays the integration through.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deps {
    /// Per client with blocks, sorted by client.
    runs: Vec<Run>,
    /// Per client, sorted: one past the highest id a deletion refers to.
    refs: Vec<(u64, u64)>,
    /// Every block in update order, each client's blocks together (a [`Run`] names its range).
    blocks: Vec<Block>,
    /// Ids (client, clock) that block origins and parents refer to.
    block_refs: Vec<(u64, u64)>,
}

/// One client's blocks in an update.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    client: u64,
    /// The clock the document must have reached: where the first block starts.
    need: u64,
    /// The clock the last block ends at.
    end: u64,
    /// Its blocks, in `Deps::blocks`.
    blocks: std::ops::Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    /// The clock one past the block's last unit: a block's end never falls below the one
    /// before it in its run.
    end: u64,
    /// Its references, in `Deps::block_refs`.
    refs: std::ops::Range<usize>,
}

/// How many blocks made it in when yrs's integration is played through, and the work it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Integration {
    integrated: usize,
    /// Blocks visited plus references followed: linear in the update's size.
    steps: usize,
}

impl Deps {
    /// Whether everything the update builds on is known, `known(client)` being the next clock
    /// expected from that client (a state vector lookup), so that yrs integrates all of it.
    pub fn met_by(&self, known: impl Fn(u64) -> u64) -> bool {
        if self.runs.iter().any(|r| known(r.client) < r.need) {
            return false;
        }
        // The usual case (an edit building only on what the document has) needs no playing
        // through, and nothing allocated.
        let all_known = self.block_refs.iter().all(|&(c, k)| k < known(c));
        if !all_known && self.integrate(&known).integrated < self.blocks.len() {
            return false;
        }
        // Every block is in: each client reaches its own end, or what the document has.
        self.refs.iter().all(|&(c, upto)| {
            let own = self
                .runs
                .binary_search_by_key(&c, |r| r.client)
                .map_or(0, |i| self.runs[i].end);
            known(c).max(own) >= upto
        })
    }

    /// Plays yrs's integration through: a block goes in once every id it refers to is known
    /// or was put in by a block before it, and each client's blocks go in order. A block that
    /// refers to itself, to a later block of its own run, or to a cycle never goes in.
    ///
    /// One topological pass (Kahn's algorithm) over the blocks and their references. The
    /// repeated passes over all clients this replaced took one pass per link of a chain of
    /// origins across clients: ~10^10 steps for the ~170k one-block clients a 2 MiB update
    /// can carry (issue 16).
    fn integrate(&self, known: &impl Fn(u64) -> u64) -> Integration {
        let n = self.blocks.len();
        let mut steps = 0usize;
        // Per block: how many of the blocks it waits for are not in yet (the one before it in
        // its run, and the one each reference not yet known lies in); edges (waited-for block,
        // waiting block).
        let mut waiting = vec![0u32; n];
        let mut edges: Vec<(usize, usize)> = Vec::with_capacity(n + self.block_refs.len());
        for run in &self.runs {
            for i in run.blocks.clone() {
                if i > run.blocks.start {
                    waiting[i] += 1;
                    edges.push((i - 1, i));
                }
                for &(c, k) in &self.block_refs[self.blocks[i].refs.clone()] {
                    steps += 1;
                    if k < known(c) {
                        continue;
                    }
                    waiting[i] += 1;
                    // Nothing in the update reaches the id either: the block (and so the rest
                    // of its run) stays out, with no edge that could ever let it in.
                    if let Some(target) = self.block_reaching(c, k) {
                        edges.push((target, i));
                    }
                }
            }
        }
        // The waiting blocks of each block, grouped (a counting sort by waited-for block).
        let mut first = vec![0usize; n + 1];
        for &(t, _) in &edges {
            first[t + 1] += 1;
        }
        for t in 0..n {
            first[t + 1] += first[t];
        }
        let mut dependents = vec![0usize; edges.len()];
        let mut fill = first.clone();
        for &(t, d) in &edges {
            dependents[fill[t]] = d;
            fill[t] += 1;
        }
        let mut ready: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
        let mut integrated = 0;
        while let Some(i) = ready.pop() {
            steps += 1;
            integrated += 1;
            for &d in &dependents[first[i]..first[i + 1]] {
                steps += 1;
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.push(d);
                }
            }
        }
        Integration { integrated, steps }
    }

    /// The block of this update that holds id (`client`, `clock`), if any.
    fn block_reaching(&self, client: u64, clock: u64) -> Option<usize> {
        let run = &self.runs[self.runs.binary_search_by_key(&client, |r| r.client).ok()?];
        let blocks = &self.blocks[run.blocks.clone()];
        let at = blocks.partition_point(|b| b.end <= clock);
        (at < blocks.len()).then_some(run.blocks.start + at)
    }

    /// Every client whose clock [`met_by`](Self::met_by) may ask for, sorted, each once.
    pub fn clients(&self) -> Vec<u64> {
        let mut all: Vec<u64> = (self.runs.iter().map(|r| r.client))
            .chain(self.refs.iter().map(|&(c, _)| c))
            .chain(self.block_refs.iter().map(|&(c, _)| c))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
    /// Clients whose blocks need more than `known` has: the writers of what is missing.
    pub fn short_of<'a>(
        &'a self,
        known: impl Fn(u64) -> u64 + 'a,
    ) -> impl Iterator<Item = u64> + 'a {
        self.runs
            .iter()
            .filter(move |r| known(r.client) < r.need)
            .map(|r| r.client)
    }

    /// Per client, the clock this update's blocks reach: what a later update from the same
    /// writer may build on before this one is applied.
    pub fn ends(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|r| (r.client, r.end))
    }

    /// Whether the update carries nothing: no blocks and no deletions (what a y-websocket
    /// client's step 2 usually is).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.refs.is_empty()
    }

    /// Sorts by client. A client listed twice is refused: yrs appends the second list to the
    /// first, out of clock order, and its skip bookkeeping then underflows (found by the
    /// `yjs_message` fuzz target); Yjs and yrs encoders never write one.
    fn finish(mut self) -> Scan<Self> {
        self.runs.sort_unstable_by_key(|r| r.client);
        if self.runs.windows(2).any(|w| w[0].client == w[1].client) {
            return Err(Rejected::Malformed("a client is listed twice"));
        }
        self.refs.sort_unstable();
        self.refs.dedup_by(|later, kept| {
            later.0 == kept.0 && {
                kept.1 = kept.1.max(later.1);
                true
            }
        });
        Ok(self)
    }

    /// A deleted id.
    fn refer(&mut self, client: u64, clock: u64) {
        // Ids past `MAX_CLOCK` are refused by the scan; saturating keeps this total anyway.
        let upto = clock.saturating_add(1);
        match self.refs.last_mut() {
            Some(last) if last.0 == client => last.1 = last.1.max(upto),
            _ => self.refs.push((client, upto)),
        }
    }
}

/// Highest clock yrs can represent (its clocks are u32).
const MAX_CLOCK: u64 = u32::MAX as u64;

/// Client ids are 53-bit (JavaScript-safe) integers; yrs stores them with the top 11 bits as a
/// tag, so a larger id would alias another (and trips a debug assertion).
const MAX_CLIENT: u64 = (1 << 53) - 1;

fn read_client(r: &mut Lib0Reader<'_>) -> Scan<u64> {
    let client = r.var_u64()?;
    if client > MAX_CLIENT {
        return Err(Rejected::Malformed("client id beyond 2^53"));
    }
    Ok(client)
}

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

const HAS_ORIGIN: u8 = 0b1000_0000;
const HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
const HAS_PARENT_SUB: u8 = 0b0010_0000;

/// An item id (client, clock); clocks past what yrs can hold are refused.
fn read_id(r: &mut Lib0Reader<'_>) -> Scan<(u64, u64)> {
    let (client, clock) = (read_client(r)?, r.var_u64()?);
    if clock > MAX_CLOCK {
        return Err(Rejected::Malformed("clock beyond 2^32"));
    }
    Ok((client, clock))
}

/// One block: its length in clock units.
fn scan_block(r: &mut Lib0Reader<'_>, deps: &mut Deps) -> Scan<u64> {
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
    // Content lengths as yrs counts clocks: strings in UTF-16 code units, `Any` per value.
    let len = match info & 0b1111 {
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
fn json_depth_ok(s: &str) -> Scan<()> {
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

/// A client update that passed [`check_update`]. The decoded update is not kept: the trial
/// consumed it, and the owner decodes the bytes again when it applies the entry (one decode
/// per apply is what yrs's API allows: `apply_update` takes the update by value).
pub struct Checked {
    /// What it builds on; the caller checks these against the document before appending.
    pub deps: Deps,
    /// What the owner needs of the scan once the entry is in the log; appended beside the
    /// bytes (see [`Reach`]).
    pub reach: Reach,
}

/// Per client, the clock an update's blocks reach: all the owner needs of the scan when it
/// applies the update (the writers' known clocks it publishes for the write door).
///
/// Carried with the log entry so that the owner of a node's own appends does not walk the
/// update a second time. It holds the very bytes it was computed from, and [`Reach::of`]
/// answers only for those (same allocation, same length: `Bytes` never change, and the
/// allocation cannot be reused while this holds it), so a reach can never be read for other
/// bytes; anything else (entries read back from storage or written by another node) is
/// scanned as before.
///
/// Boxed: entries wait in the embedded log's pending set until redb has them, and an
/// `Option<Reach>` in every entry costs a pointer there, not the whole of it.
#[derive(Debug, Clone)]
pub struct Reach(Box<Scanned>);

#[derive(Debug, Clone)]
struct Scanned {
    bytes: Bytes,
    ends: Ends,
}

/// Most updates are one writer's edit: one client, kept inline (no allocation).
#[derive(Debug, Clone)]
enum Ends {
    One((u64, u64)),
    Many(Box<[(u64, u64)]>),
}

impl Reach {
    fn new(scanned: &Bytes, deps: &Deps) -> Reach {
        let ends = match deps.runs.as_slice() {
            [] => Ends::Many(Box::new([])),
            [r] => Ends::One((r.client, r.end)),
            runs => Ends::Many(runs.iter().map(|r| (r.client, r.end)).collect()),
        };
        Reach(Box::new(Scanned {
            bytes: scanned.clone(),
            ends,
        }))
    }

    /// Per client, the clock `update`'s blocks reach, if this reach was computed from exactly
    /// these bytes; `None` for any other bytes.
    pub fn of(&self, update: &Bytes) -> Option<&[(u64, u64)]> {
        let Scanned { bytes, ends } = &*self.0;
        let same = bytes.as_ptr() == update.as_ptr() && bytes.len() == update.len();
        same.then_some(match ends {
            Ends::One(pair) => std::slice::from_ref(pair),
            Ends::Many(all) => all,
        })
    }
}

/// Full check of a client update before it may be appended to the log: size, structure,
/// decode, and a trial on a scratch document that must still encode afterwards.
pub fn check_update(update: &Bytes, max_bytes: usize) -> Result<Checked, Rejected> {
    if update.len() > max_bytes {
        return Err(Rejected::TooLarge(update.len(), max_bytes));
    }
    let deps = scan_update(update)?;
    // The known panics are refused by the scan above and the fuzz targets (server/fuzz) run
    // `trial_apply` without this net, so a new one is found and fixed at its root; the net
    // stays so that a yrs panic nobody has found yet costs one update, not the connection.
    let trial = catch_unwind(AssertUnwindSafe(|| trial_apply(update)));
    match trial {
        Ok(Ok(())) => Ok(Checked {
            reach: Reach::new(update, &deps),
            deps,
        }),
        Ok(Err(e)) => Err(Rejected::Unapplicable(e)),
        Err(_) => Err(Rejected::Unapplicable("the update makes yrs panic".into())),
    }
}

/// Applies a scanned update to an empty document and re-encodes it. An update that depends on
/// state not passed in stays pending there, which is fine; what must not happen is a panic or a
/// document that cannot be encoded any more.
pub fn trial_apply(update: &[u8]) -> Result<(), String> {
    let doc = Doc::new();
    let mut txn = doc.transact_mut();
    let copy = Update::decode_v1(update).map_err(|e| e.to_string())?;
    txn.apply_update(copy).map_err(|e| e.to_string())?;
    let encoded = txn.encode_state_as_update_v1(&StateVector::default());
    Update::decode_v1(&encoded).map_err(|e| format!("does not re-encode: {e}"))?;
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

/// Decodes a y-protocols awareness update, refusing states that are not JSON (stock Yjs
/// clients `JSON.parse` every state they receive; one bad string would break all of them).
pub fn decode_awareness(bytes: &[u8], max_bytes: usize) -> Result<AwarenessUpdate, Rejected> {
    if bytes.len() > max_bytes {
        return Err(Rejected::TooLarge(bytes.len(), max_bytes));
    }
    let mut r = Lib0Reader::new(bytes);
    let n = r.count(3)?;
    for _ in 0..n {
        read_client(&mut r)?;
        if r.var_u64()? > MAX_CLOCK {
            return Err(Rejected::Malformed("awareness clock beyond 2^32"));
        }
        let json = r.string()?;
        json_depth_ok(json)?;
        if serde_json::from_str::<serde::de::IgnoredAny>(json).is_err() {
            return Err(Rejected::BadJson);
        }
    }
    AwarenessUpdate::decode_v1(bytes).map_err(|_| Rejected::Malformed("awareness update"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::encoder::Encode;
    use yrs::{Any, Array, GetString, Map, Text};

    /// [`check_update`] on bytes of any kind.
    fn check(update: &[u8], max_bytes: usize) -> Result<Checked, Rejected> {
        check_update(&Bytes::copy_from_slice(update), max_bytes)
    }

    fn sample_updates() -> Vec<Vec<u8>> {
        let doc = Doc::with_client_id(7);
        let text = doc.get_or_insert_text("t");
        let map = doc.get_or_insert_map("m");
        let arr = doc.get_or_insert_array("a");
        let mut out = Vec::new();
        let mut sv = StateVector::default();
        for i in 0..5 {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, "héllo ");
            map.insert(
                &mut txn,
                format!("k{i}"),
                Any::from(vec![Any::from(1.5), Any::from("x")]),
            );
            arr.push_back(&mut txn, Any::from(true));
            if i == 3 {
                text.remove_range(&mut txn, 0, 1);
            }
            drop(txn);
            let txn = doc.transact();
            out.push(txn.encode_state_as_update_v1(&sv));
            sv = txn.state_vector();
        }
        assert!(text.get_string(&doc.transact()).contains("llo"));
        out
    }

    #[test]
    fn real_updates_pass_the_scan_and_the_check() {
        for u in sample_updates() {
            scan_update(&u).expect("scan");
            check(&u, 1 << 20).expect("check");
        }
        scan_update(Update::EMPTY_V1).expect("empty update");
    }

    #[test]
    fn a_reach_answers_only_for_the_bytes_it_was_scanned_from() {
        let trace = two_writer_trace();
        let merged = yrs::merge_updates_v1(trace.iter().map(Vec::as_slice)).expect("merges");
        for u in trace.iter().chain([&merged]) {
            let bytes = Bytes::copy_from_slice(u);
            let checked = check_update(&bytes, 1 << 20).expect("valid");
            let ends: Vec<(u64, u64)> = checked.deps.ends().collect();
            assert_eq!(checked.reach.of(&bytes), Some(ends.as_slice()));
            assert_eq!(checked.reach.of(&bytes.clone()), Some(ends.as_slice()));
            // Equal content elsewhere, or a part of the same allocation, is other bytes.
            assert_eq!(checked.reach.of(&Bytes::copy_from_slice(u)), None);
            assert_eq!(checked.reach.of(&bytes.slice(..bytes.len() - 1)), None);
        }
        let multi = check_update(&Bytes::from(merged), 1 << 20).expect("valid");
        assert!(
            multi.deps.ends().count() > 1,
            "both writers' runs are carried"
        );
    }

    /// Updates of two writers editing concurrently (text, map, array, a nested type, deletions
    /// of each other's content), each encoded against what its writer had seen.
    fn two_writer_trace() -> Vec<Vec<u8>> {
        let a = Doc::with_client_id(1);
        let b = Doc::with_client_id(2);
        let mut out = Vec::new();
        for round in 0..6u32 {
            for (i, doc) in [&a, &b].into_iter().enumerate() {
                let before = doc.transact().state_vector();
                {
                    let text = doc.get_or_insert_text("t");
                    let map = doc.get_or_insert_map("m");
                    let mut txn = doc.transact_mut();
                    let len = text.len(&txn);
                    // At the start (builds on a right origin) and at the end (a left origin);
                    // the emoji counts two clock units.
                    let at = if i == 0 { 0 } else { len };
                    text.insert(&mut txn, at, if i == 0 { "ab😀" } else { "xé" });
                    if round % 2 == 1 && len > 2 {
                        text.remove_range(&mut txn, 0, 2);
                    }
                    let nested = map.insert(
                        &mut txn,
                        format!("n{round}{i}"),
                        yrs::ArrayPrelim::default(),
                    );
                    nested.push_back(&mut txn, Any::from(f64::from(round)));
                }
                out.push(doc.transact().encode_state_as_update_v1(&before));
            }
            // Exchange everything so the next round builds on the other writer's content.
            crate::fuzzing::exchange(&a, &b);
        }
        out
    }

    #[test]
    fn deps_predict_exactly_when_yrs_would_park_an_update() {
        let trace = two_writer_trace();
        let (mut met, mut unmet) = (0, 0);
        for j in 0..=trace.len() {
            // A document holding the first j updates.
            let doc = Doc::new();
            for u in &trace[..j] {
                doc.transact_mut()
                    .apply_update(Update::decode_v1(u).expect("decodes"))
                    .expect("applies");
            }
            assert!(!doc.transact().has_missing_updates());
            let sv = doc.transact().state_vector();
            for u in &trace {
                let deps = check(u, 1 << 20).expect("valid").deps;
                let predicted = deps.met_by(|c| u64::from(sv.get(&yrs::ClientID::new(c))));
                let probe = Doc::new();
                let mut txn = probe.transact_mut();
                txn.apply_update(
                    Update::decode_v1(
                        &doc.transact()
                            .encode_state_as_update_v1(&StateVector::default()),
                    )
                    .expect("decodes"),
                )
                .expect("applies");
                txn.apply_update(Update::decode_v1(u).expect("decodes"))
                    .expect("applies");
                assert_eq!(
                    predicted,
                    !txn.has_missing_updates(),
                    "update {u:?} after {j}"
                );
                if predicted { met += 1 } else { unmet += 1 }
            }
        }
        assert!(
            met > 0 && unmet > 0,
            "both outcomes exercised: {met} met, {unmet} unmet"
        );
    }

    #[test]
    fn a_writer_may_build_on_its_own_unapplied_updates() {
        let trace = sample_updates();
        let mut own: std::collections::HashMap<u64, u64> = Default::default();
        for u in &trace {
            let deps = check(u, 1 << 20).expect("valid").deps;
            assert!(deps.met_by(|c| own.get(&c).copied().unwrap_or(0)));
            for (c, end) in deps.ends() {
                own.insert(c, end);
            }
        }
        let last = check(trace.last().expect("updates"), 1 << 20)
            .expect("valid")
            .deps;
        assert!(
            !last.met_by(|_| 0),
            "the last update builds on the ones before it"
        );
    }

    fn var(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// One character typed by each of `clients` clients (ids 1..=clients), each to the right of
    /// the next client's: client i's block has its origin in client i + 1's, and only the last
    /// client's hangs from the root. Listed from client 1 up, the worst order for a check that
    /// passes over the clients until nothing moves: each pass lets one more client in.
    /// `last_origin`: the client the last block's origin is in instead (closing a cycle).
    fn chained_update(clients: u64, last_origin: Option<u64>) -> Vec<u8> {
        let mut u = Vec::new();
        var(&mut u, clients);
        for c in 1..=clients {
            u.push(1); // one block
            var(&mut u, c);
            u.push(0); // from clock 0
            let origin = if c < clients {
                Some(c + 1)
            } else {
                last_origin
            };
            if let Some(origin) = origin {
                u.push(HAS_ORIGIN | 4);
                var(&mut u, origin);
                u.push(0);
            } else {
                u.extend([4, 1, 1, b't']); // string content in root "t"
            }
            u.extend([1, b'x']);
        }
        u.push(0); // empty delete set
        u
    }

    /// `clients` clients with one block each in root "t", and deleted ranges of `deleters`
    /// clients.
    fn wide_update(clients: u64, deleters: u64) -> Vec<u8> {
        let mut u = Vec::new();
        var(&mut u, clients);
        for c in 1..=clients {
            u.push(1);
            var(&mut u, c);
            u.extend([0, 4, 1, 1, b't', 1, b'x']);
        }
        var(&mut u, deleters);
        for c in 1..=deleters {
            var(&mut u, c);
            u.extend([1, 0, 1]); // one range: clock 0, length 1
        }
        u
    }

    /// What `met_by` answered before it became one pass (kept as the oracle): passes over the
    /// clients, in update order, until one lets nothing in.
    fn met_by_passes(deps: &Deps, known: impl Fn(u64) -> u64) -> bool {
        if deps.runs.iter().any(|r| known(r.client) < r.need) {
            return false;
        }
        let mut reached: HashMap<u64, u64> = deps
            .runs
            .iter()
            .map(|r| (r.client, known(r.client)))
            .collect();
        let mut runs: Vec<&Run> = deps.runs.iter().collect();
        runs.sort_by_key(|r| r.blocks.start);
        let mut cursors: Vec<usize> = runs.iter().map(|r| r.blocks.start).collect();
        loop {
            let (mut progress, mut done) = (false, true);
            for (run, cursor) in runs.iter().zip(cursors.iter_mut()) {
                while *cursor < run.blocks.end {
                    let b = &deps.blocks[*cursor];
                    let ready = deps.block_refs[b.refs.clone()]
                        .iter()
                        .all(|&(c, k)| k < reached.get(&c).copied().unwrap_or_else(|| known(c)));
                    if !ready {
                        break;
                    }
                    let at = reached.entry(run.client).or_insert(0);
                    *at = (*at).max(b.end);
                    *cursor += 1;
                    progress = true;
                }
                done &= *cursor == run.blocks.end;
            }
            if done {
                break;
            }
            if !progress {
                return false;
            }
        }
        deps.refs
            .iter()
            .all(|&(c, upto)| reached.get(&c).copied().unwrap_or_else(|| known(c)) >= upto)
    }

    use std::collections::HashMap;

    #[test]
    fn a_chain_of_origins_across_clients_is_checked_in_one_pass() {
        let clients = MAX_UPDATE_CLIENTS as u64;
        let u = chained_update(clients, None);
        let deps = scan_update(&u).expect("a well-formed update");
        assert_eq!(deps.blocks.len(), MAX_UPDATE_CLIENTS);
        assert!(
            deps.met_by(|_| 0),
            "the chain is whole: every block goes in"
        );
        let run = deps.integrate(&|_| 0);
        assert_eq!(run.integrated, deps.blocks.len());
        // Each block is visited once and each reference followed at most twice (looked up,
        // then released); the passes this replaced took ~clients^2 / 2 = 2 * 10^9 steps here.
        let linear = deps.blocks.len() + 2 * deps.block_refs.len();
        assert!(
            run.steps <= linear,
            "{} steps for {} blocks and {} references",
            run.steps,
            deps.blocks.len(),
            deps.block_refs.len()
        );
        // The last block hanging from the first instead of the root: a cycle, nothing goes in.
        let cyclic = scan_update(&chained_update(clients, Some(1))).expect("well-formed");
        assert!(!cyclic.met_by(|_| 0), "a cycle of origins stays pending");
        assert!(cyclic.integrate(&|_| 0).steps <= linear + 1);
        // A document that has the whole chain already takes it again at once (every reference
        // known) and one that has half of it takes the rest.
        assert!(deps.met_by(|_| 1));
        assert!(deps.met_by(|c| u64::from(c > clients / 2)));
    }

    #[test]
    fn yrs_integrates_the_chained_update_the_check_lets_in() {
        let u = chained_update(2_000, None);
        let checked = check(&u, 1 << 20).expect("valid");
        assert!(checked.deps.met_by(|_| 0));
        let doc = Doc::new();
        let mut txn = doc.transact_mut();
        txn.apply_update(Update::decode_v1(&u).expect("decodes"))
            .expect("applies");
        assert!(!txn.has_missing_updates());
        drop(txn);
        let text = doc.get_or_insert_text("t");
        assert_eq!(text.len(&doc.transact()), 2_000);
    }

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

    /// Updates with references inside themselves across clients: merges of consecutive runs of
    /// the two-writer trace.
    fn merged_windows(trace: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for from in 0..trace.len() {
            for to in from + 1..=trace.len() {
                let parts: Vec<&[u8]> = trace[from..to].iter().map(Vec::as_slice).collect();
                out.push(yrs::merge_updates_v1(parts).expect("merges"));
            }
        }
        out
    }

    #[test]
    fn one_pass_answers_as_the_passes_did() {
        let trace = two_writer_trace();
        let updates: Vec<Vec<u8>> = trace
            .iter()
            .cloned()
            .chain(merged_windows(&trace))
            .collect();
        let mut states: Vec<StateVector> = Vec::new();
        for j in 0..=trace.len() {
            let doc = Doc::new();
            for u in &trace[..j] {
                doc.transact_mut()
                    .apply_update(Update::decode_v1(u).expect("decodes"))
                    .expect("applies");
            }
            states.push(doc.transact().state_vector());
        }
        let (mut met, mut unmet, mut played) = (0, 0, 0);
        for u in &updates {
            let deps = scan_update(u).expect("valid");
            for sv in &states {
                let known = |c| u64::from(sv.get(&yrs::ClientID::new(c)));
                let answer = deps.met_by(known);
                assert_eq!(answer, met_by_passes(&deps, known), "update {u:?}");
                if !deps.block_refs.iter().all(|&(c, k)| k < known(c)) {
                    played += 1;
                }
                if answer { met += 1 } else { unmet += 1 }
            }
        }
        assert!(
            met > 0 && unmet > 0 && played > 0,
            "every path exercised: {met} met, {unmet} unmet, {played} played through"
        );
    }

    #[test]
    fn short_of_names_the_writer_whose_earlier_update_is_missing() {
        // The trace alternates writers 1 and 2; each update continues its writer's previous one.
        let trace = two_writer_trace();
        let doc = Doc::new();
        let mut states = vec![doc.transact().state_vector()];
        for u in &trace {
            doc.transact_mut()
                .apply_update(Update::decode_v1(u).expect("decodes"))
                .expect("applies");
            states.push(doc.transact().state_vector());
        }
        for k in 2..trace.len() {
            let deps = scan_update(&trace[k]).expect("valid");
            let short = |sv: &StateVector| -> Vec<u64> {
                deps.short_of(|c| u64::from(sv.get(&yrs::ClientID::new(c))))
                    .collect()
            };
            let writer = k as u64 % 2 + 1;
            assert_eq!(short(&states[k - 2]), vec![writer], "update {k}");
            assert_eq!(short(&states[k - 1]), Vec::<u64>::new(), "update {k}");
            assert!(deps.met_by(|c| u64::from(states[k].get(&yrs::ClientID::new(c)))));
        }
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

    fn nested_array_update(depth: usize) -> Vec<u8> {
        // one client, one block at clock 0 in root map "m" under key "k", content Any
        let mut u = vec![1, 1, 1, 0];
        u.push(HAS_PARENT_SUB | 8);
        u.extend([1, 1, b'm', 1, b'k']); // parent info: named root "m"; parent sub "k"
        u.push(1); // one Any value
        for _ in 0..depth {
            u.extend([117, 1]);
        }
        u.push(126); // null at the bottom
        u.push(0); // empty delete set
        u
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

    #[test]
    fn known_crashers_are_rejected() {
        // reliability.md §2: accepted by yrs, after which the document no longer encodes.
        let poison = [
            0x01, 0x01, 0x01, 0x00, 0x62, 0x08, 0x01, 0x01, 0x01, 0x75, 0x01, 0x7e, 0x00,
        ];
        assert!(check(&poison, 1 << 20).is_err());
        // betteroffice#224: invalid UTF-8 in a string
        let bad_utf8 = [1, 1, 1, 0, 4, 1, 1, b't', 2, 0xff, 0xfe, 0];
        assert!(check(&bad_utf8, 1 << 20).is_err());
        // counts that promise more than the input holds
        assert!(decode_state_vector(&[0x80, 0xe5, 0x9a, 0x77]).is_err());
        assert!(scan_update(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(decode_awareness(&[0x80, 0xe5, 0x9a, 0x77], 1 << 20).is_err());
    }

    #[test]
    fn every_truncation_and_byte_flip_of_real_updates_is_handled() {
        for u in sample_updates() {
            for cut in 0..u.len() {
                let _ = check(&u[..cut], 1 << 20);
            }
            for i in 0..u.len() {
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut m = u.clone();
                    m[i] ^= flip;
                    let _ = check(&m, 1 << 20);
                }
            }
        }
    }

    #[test]
    fn size_limit_applies_first() {
        let u = sample_updates().remove(0);
        assert_eq!(check(&u, 3).err(), Some(Rejected::TooLarge(u.len(), 3)));
    }

    #[test]
    fn awareness_must_carry_json() {
        let mut good = yrs::sync::Awareness::new(Doc::with_client_id(1));
        good.set_local_state_raw(r#"{"name":"ann"}"#);
        let bytes = good.update().expect("update").encode_v1();
        assert!(decode_awareness(&bytes, 1 << 20).is_ok());
        let mut bad = yrs::sync::Awareness::new(Doc::with_client_id(2));
        bad.set_local_state_raw("{not json");
        let bytes = bad.update().expect("update").encode_v1();
        assert_eq!(
            decode_awareness(&bytes, 1 << 20).err(),
            Some(Rejected::BadJson)
        );
    }
}
