//! Read side, for very large answers (data-flow step 6): one encoded yrs update cut into
//! several that each apply on their own, in causal order.
//!
//! Why: a stock y-websocket client reconnects when 30 s pass without a *message* (yhub#55).
//! A whole-document answer larger than a slow link carries in that time arrives as one
//! message, however it is fragmented, so such a client never finishes its first sync. Sent as
//! pieces of about a megabyte, the answer gives the client a message at least every piece.
//!
//! yrs has no API to encode part of a document, so this walks the encoded update with the write
//! door's scanner and copies whole blocks: in the v1 encoding a block's bytes do not depend on
//! the blocks around it, only the first block of a client's run carries its clock. The blocks
//! are put in causal order (each after the blocks its origins and parent name, as yrs and Yjs
//! integrate them), so a client applies every piece completely as it arrives instead of
//! parking blocks whose dependencies come later and re-merging them with every piece. The
//! delete set goes with the last piece. A block larger than a piece is a piece on its own.

use super::MAX_UPDATE_CLIENTS;
use super::deps::Deps;
use super::lib0::{Lib0Reader, read_client};
use super::scan::scan_block;
use std::collections::HashMap;

/// Blocks past which an update is not split. The walk holds 32 bytes per block and 16 per
/// reference to another client's block (at most three per block, usually fewer): at most 8 MB
/// plus those. Splitting a 20 MB document of 2,000 blocks took 22 ms here, one of 200,000
/// blocks 34 ms (encoding it: 36 and 58 ms). An update with more (megabytes of
/// single-character edits) goes as one message, as before.
const MAX_BLOCKS: usize = 250_000;

/// One block of the update: where its bytes are, its first clock, and where its references
/// end in [`Walk::refs`] (they start where the previous block's end).
struct Block {
    start: u32,
    end: u32,
    refs_end: u32,
    clock: u64,
}

/// One client's blocks (a range of [`Walk::blocks`]), clock order.
struct Section {
    client: u64,
    blocks: std::ops::Range<usize>,
}

/// The update's blocks by client, the ids they refer to in other clients, and where the
/// delete set starts.
struct Walk {
    sections: Vec<Section>,
    blocks: Vec<Block>,
    refs: Vec<(u64, u64)>,
    delete_set: usize,
}

impl Walk {
    fn refs_of(&self, block: usize) -> &[(u64, u64)] {
        let from = block
            .checked_sub(1)
            .map_or(0, |b| self.blocks[b].refs_end as usize);
        &self.refs[from..self.blocks[block].refs_end as usize]
    }
}

/// Walks `update` (whose length fits a u32), or `None` past [`MAX_BLOCKS`] or if it does not
/// scan.
fn walk(update: &[u8]) -> Option<Walk> {
    let mut r = Lib0Reader::new(update);
    let mut deps = Deps::default();
    let clients = r.count(3).ok()?;
    if clients > MAX_UPDATE_CLIENTS {
        return None;
    }
    let mut w = Walk {
        sections: Vec::with_capacity(clients),
        blocks: Vec::new(),
        refs: Vec::new(),
        delete_set: 0,
    };
    for _ in 0..clients {
        let count = r.count(2).ok()?;
        if w.blocks.len() + count > MAX_BLOCKS {
            return None;
        }
        let client = read_client(&mut r).ok()?;
        let mut clock = r.var_u64().ok()?;
        let first = w.blocks.len();
        for _ in 0..count {
            let start = r.position() as u32;
            deps.block_refs.clear();
            let len = scan_block(&mut r, &mut deps).ok()?;
            // A block never waits on its own client's earlier blocks: they come first anyway.
            w.refs
                .extend(deps.block_refs.iter().filter(|(c, _)| *c != client));
            w.blocks.push(Block {
                start,
                end: r.position() as u32,
                refs_end: w.refs.len() as u32,
                clock,
            });
            clock = clock.saturating_add(len);
        }
        w.sections.push(Section {
            client,
            blocks: first..w.blocks.len(),
        });
    }
    w.delete_set = r.position();
    Some(w)
}

/// Every block as (section, index in [`Walk::blocks`]) in an order where each comes after the
/// blocks it refers to that this update holds. A reference this update cannot satisfy (the
/// receiver has it, or it is missing anyway) and a cycle (only a malformed update has one) do
/// not hold a block back.
fn causal_order(w: &Walk) -> Vec<(u32, u32)> {
    let by_client: HashMap<u64, usize> = w
        .sections
        .iter()
        .enumerate()
        .map(|(i, s)| (s.client, i))
        .collect();
    // Per section: the next block to emit.
    let mut next: Vec<usize> = w.sections.iter().map(|s| s.blocks.start).collect();
    let mut on_stack = vec![false; w.sections.len()];
    let mut order = Vec::with_capacity(w.blocks.len());
    // A reference to (client, clock) waits while that client's section still has a block
    // covering or before it.
    let waits_on = |next: &[usize], (client, clock): (u64, u64)| -> Option<usize> {
        let &d = by_client.get(&client)?;
        let pending = next[d];
        (pending < w.sections[d].blocks.end && w.blocks[pending].clock <= clock).then_some(d)
    };
    let mut stack = Vec::new();
    for first in 0..w.sections.len() {
        while next[first] < w.sections[first].blocks.end {
            stack.push(first);
            on_stack[first] = true;
            while let Some(&top) = stack.last() {
                let block = next[top];
                let dep = (block < w.sections[top].blocks.end)
                    .then(|| {
                        w.refs_of(block)
                            .iter()
                            .filter_map(|&id| waits_on(&next, id))
                            .find(|&d| !on_stack[d])
                    })
                    .flatten();
                match dep {
                    Some(d) => {
                        on_stack[d] = true;
                        stack.push(d);
                    }
                    None => {
                        if block < w.sections[top].blocks.end {
                            order.push((top as u32, block as u32));
                            next[top] += 1;
                        }
                        on_stack[top] = false;
                        stack.pop();
                    }
                }
            }
        }
    }
    order
}

/// The most a run's header takes: three varints (block count, client, clock).
const RUN_HEADER: usize = 30;

fn put_var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Cuts `update` (a yrs v1 update, such as a whole document's state) into updates of about
/// `piece` bytes or fewer (a larger block is one on its own) that applied one after another
/// make the same document, each applying completely when the ones before it have been. `None`
/// when the update is not larger than `piece`, holds a single block, or does not scan.
pub fn split_update(update: &[u8], piece: usize) -> Option<Vec<Vec<u8>>> {
    if update.len() <= piece || u32::try_from(update.len()).is_err() {
        return None;
    }
    let w = walk(update)?;
    let order = causal_order(&w);
    if order.len() < 2 {
        return None;
    }
    let mut pieces = Vec::new();
    // The piece being filled: per section, the run of blocks it holds (section, first, last
    // index in `w.blocks`).
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    let mut run_of: HashMap<u32, usize> = HashMap::new();
    let mut bytes = 0;
    let encode = |runs: &[(u32, u32, u32)], delete_set: &[u8]| {
        let body: usize = runs
            .iter()
            .map(|&(_, first, last)| {
                let b = &w.blocks;
                (b[last as usize].end - b[first as usize].start) as usize + RUN_HEADER
            })
            .sum();
        let mut out = Vec::with_capacity(body + delete_set.len() + 10);
        put_var(&mut out, runs.len() as u64);
        // A run's blocks are consecutive in the update, so their bytes are one slice.
        for &(section, first, last) in runs {
            let (a, b) = (&w.blocks[first as usize], &w.blocks[last as usize]);
            put_var(&mut out, u64::from(last - first + 1));
            put_var(&mut out, w.sections[section as usize].client);
            put_var(&mut out, a.clock);
            out.extend_from_slice(&update[a.start as usize..b.end as usize]);
        }
        out.extend_from_slice(delete_set);
        out
    };
    for (section, block) in order {
        let b = &w.blocks[block as usize];
        // A block that starts a run in this piece brings the run's header too.
        let header = |run_of: &HashMap<u32, usize>| {
            if run_of.contains_key(&section) {
                0
            } else {
                RUN_HEADER
            }
        };
        let len = (b.end - b.start) as usize;
        if bytes > 0 && bytes + header(&run_of) + len > piece {
            pieces.push(encode(&runs, &[0]));
            runs.clear();
            run_of.clear();
            bytes = 0;
        }
        bytes += header(&run_of) + len;
        match run_of.get(&section) {
            // A section's blocks come in clock order, so this one continues its run.
            Some(&r) => runs[r].2 = block,
            None => {
                run_of.insert(section, runs.len());
                runs.push((section, block, block));
            }
        }
    }
    pieces.push(encode(&runs, &update[w.delete_set..]));
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

    /// Two writers typing into each other's text, with deletions: blocks of each client refer
    /// to the other's, so pieces in update order would leave blocks waiting.
    fn interleaved(edits: usize) -> Doc {
        let a = Doc::with_client_id(1);
        let b = Doc::with_client_id(2);
        for i in 0..edits {
            let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            let text = from.get_or_insert_text("t");
            {
                let mut txn = from.transact_mut();
                let len = text.len(&txn);
                let at = (i * 7) as u32 % (len + 1);
                text.insert(&mut txn, at, &format!("edit {i} "));
                if i % 5 == 4 && len > 4 {
                    text.remove_range(&mut txn, at / 2, 3);
                }
            }
            let sv = to.transact().state_vector();
            let diff = from.transact().encode_state_as_update_v1(&sv);
            let update = Update::decode_v1(&diff).expect("decodes");
            to.transact_mut().apply_update(update).expect("applies");
        }
        a
    }

    fn text_of(doc: &Doc) -> String {
        let text = doc.get_or_insert_text("t");
        text.get_string(&doc.transact())
    }

    #[test]
    fn pieces_apply_one_by_one_without_waiting_and_make_the_same_document() {
        let doc = interleaved(400);
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        let pieces = split_update(&state, 512).expect("split");
        assert!(pieces.len() > 5, "{} pieces", pieces.len());
        let copy = Doc::new();
        for (i, piece) in pieces.iter().enumerate() {
            // Only a lone block could pass the piece size (none here), and the last piece
            // carries the delete set; the rest add two bytes (the count of runs, an empty
            // delete set).
            if i + 1 < pieces.len() {
                assert!(piece.len() <= 512 + 2, "piece {i}: {} bytes", piece.len());
            }
            let update = Update::decode_v1(piece).expect("a piece decodes");
            let mut txn = copy.transact_mut();
            txn.apply_update(update).expect("a piece applies");
            assert!(
                txn.store().pending_update().is_none(),
                "piece {i} left blocks waiting for a later one"
            );
        }
        assert_eq!(text_of(&copy), text_of(&doc));
        assert_eq!(
            copy.transact().state_vector(),
            doc.transact().state_vector()
        );
        let again = copy
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert_eq!(again, state, "the same document, deletions included");
    }

    #[test]
    fn a_diff_against_a_state_vector_splits_too() {
        let doc = interleaved(300);
        let half = interleaved(150);
        let sv = half.transact().state_vector();
        let diff = doc.transact().encode_state_as_update_v1(&sv);
        let pieces = split_update(&diff, 256).expect("split");
        for piece in pieces {
            let update = Update::decode_v1(&piece).expect("decodes");
            half.transact_mut().apply_update(update).expect("applies");
        }
        assert_eq!(text_of(&half), text_of(&doc));
    }

    #[test]
    fn small_single_block_and_malformed_updates_are_not_split() {
        let doc = interleaved(50);
        let state = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert!(split_update(&state, state.len()).is_none());
        let one = Doc::new();
        let text = one.get_or_insert_text("t");
        text.insert(&mut one.transact_mut(), 0, &"x".repeat(10_000));
        let single = one
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert!(split_update(&single, 1024).is_none());
        let mut torn = state.clone();
        torn.truncate(state.len() / 2);
        assert!(split_update(&torn, 64).is_none());
    }

    #[test]
    fn an_update_of_more_blocks_than_the_walk_holds_is_not_split() {
        // One client's run of one-unit GC blocks (info 0, length 1), then an empty delete set.
        let gc_run = |blocks: usize| {
            let mut u = Vec::new();
            put_var(&mut u, 1);
            put_var(&mut u, blocks as u64);
            put_var(&mut u, 7);
            put_var(&mut u, 0);
            for _ in 0..blocks {
                u.extend_from_slice(&[0, 1]);
            }
            u.push(0);
            u
        };
        let at_most = split_update(&gc_run(MAX_BLOCKS), 64 * 1024).expect("split");
        assert_eq!(at_most.len(), 8);
        assert!(split_update(&gc_run(MAX_BLOCKS + 1), 64 * 1024).is_none());
    }
}
