//! Benchmark (not a test; the write door's check, data-flow step 4, and the owner's apply,
//! step 5): CPU per client update spent in `validate::check_update` (size, structure scan,
//! decode, trial apply on a scratch document) for the updates an editor sends: single
//! keystrokes, and 10 KB pastes; then what the owner spends per entry applying them, with the
//! reach the check carried in the entry and with a second scan of the entry (what an entry
//! without it costs: one read back from storage or through Redis).
//!
//! bench_validate [--updates 20000] [--rounds 5]
//!
//! Prints the median over rounds of µs per update for each kind. A/B a change by building this
//! binary at both commits and running them alternately.

use bytes::Bytes;
use chorus_server::validate;
use std::time::Instant;
use yrs::updates::decoder::Decode;
use yrs::{GetString, Text, Transact};

fn main() {
    let n = chorus_tests::arg("--updates", 20_000);
    let rounds = chorus_tests::arg("--rounds", 5);
    let keystrokes = typed(n, 1);
    let pastes = typed(n / 20, 10_000);
    println!(
        "bench_validate: check_update over {n} keystrokes and {} 10 KB pastes, {rounds} rounds",
        n / 20
    );
    for (name, updates) in [("keystroke", &keystrokes), ("paste 10 KB", &pastes)] {
        let check = median(rounds, || {
            let started = Instant::now();
            for u in updates.iter() {
                let checked = validate::check_update(u, 2 << 20).expect("valid");
                std::hint::black_box(checked);
            }
            per_update(started, updates.len())
        });
        println!("{name:>12}: {check:.2} µs per update (median of {rounds})");
        let checked: Vec<validate::Reach> = updates
            .iter()
            .map(|u| validate::check_update(u, 2 << 20).expect("valid").reach)
            .collect();
        for (how, carried) in [("carried reach", true), ("scan again", false)] {
            let apply = median(rounds, || {
                let doc = yrs::Doc::new();
                let started = Instant::now();
                for (u, reach) in updates.iter().zip(&checked) {
                    owner_apply(&doc, u, carried.then_some(reach));
                }
                per_update(started, updates.len())
            });
            println!("{name:>12}: owner apply, {how}: {apply:.2} µs per entry");
        }
    }
}

/// What the owner does per entry (`doc::actor` `ingest`): decode, apply, and the reach of the
/// entry's blocks.
fn owner_apply(doc: &yrs::Doc, update: &Bytes, reach: Option<&validate::Reach>) {
    let mut txn = doc.transact_mut();
    let decoded = yrs::Update::decode_v1(update).expect("decodes");
    txn.apply_update(decoded).expect("applies");
    let reached: u64 = match reach.and_then(|r| r.of(update)) {
        Some(ends) => ends.iter().map(|&(_, end)| end).sum(),
        None => validate::scan_update(update)
            .expect("scans")
            .ends()
            .map(|(_, end)| end)
            .sum(),
    };
    std::hint::black_box(reached);
}

fn median(rounds: usize, mut run: impl FnMut() -> f64) -> f64 {
    let mut per: Vec<f64> = (0..rounds).map(|_| run()).collect();
    per.sort_by(f64::total_cmp);
    per[rounds / 2]
}

fn per_update(started: Instant, n: usize) -> f64 {
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// `count` updates, each appending `chars` characters to a text, as one client types them.
fn typed(count: usize, chars: usize) -> Vec<Bytes> {
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    let chunk = "x".repeat(chars);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut txn = doc.transact_mut();
        let len = text.get_string(&txn).len() as u32;
        text.insert(&mut txn, len, &chunk);
        out.push(Bytes::from(txn.encode_update_v1()));
    }
    out
}
