//! Write path edge: what an update builds on ([`Deps`], from the scan), and whether a document's
//! clocks meet it, with yrs's integration played through when the update refers to itself.

use super::{Rejected, Scan};

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
    pub(super) runs: Vec<Run>,
    /// Per client, sorted: one past the highest id a deletion refers to.
    pub(super) refs: Vec<(u64, u64)>,
    /// Every block in update order, each client's blocks together (a [`Run`] names its range).
    pub(super) blocks: Vec<Block>,
    /// Ids (client, clock) that block origins and parents refer to.
    pub(super) block_refs: Vec<(u64, u64)>,
}

/// One client's blocks in an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) client: u64,
    /// The clock the document must have reached: where the first block starts.
    pub(super) need: u64,
    /// The clock the last block ends at.
    pub(super) end: u64,
    /// Its blocks, in `Deps::blocks`.
    pub(super) blocks: std::ops::Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Block {
    /// The clock one past the block's last unit: a block's end never falls below the one
    /// before it in its run.
    pub(super) end: u64,
    /// Its references, in `Deps::block_refs`.
    pub(super) refs: std::ops::Range<usize>,
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
    pub(super) fn finish(mut self) -> Scan<Self> {
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
    pub(super) fn refer(&mut self, client: u64, clock: u64) {
        // Ids past `MAX_CLOCK` are refused by the scan; saturating keeps this total anyway.
        let upto = clock.saturating_add(1);
        match self.refs.last_mut() {
            Some(last) if last.0 == client => last.1 = last.1.max(upto),
            _ => self.refs.push((client, upto)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::testdata::*;
    use crate::validate::{MAX_UPDATE_CLIENTS, scan_update};
    use yrs::updates::decoder::Decode;
    use yrs::{Doc, ReadTxn, StateVector, Text, Transact, Update};

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
}
