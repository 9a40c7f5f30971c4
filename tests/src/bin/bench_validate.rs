//! Benchmark (not a test; the write door's check, data-flow step 4): CPU per client update
//! spent in `validate::check_update` (size, structure scan, decode, trial apply on a scratch
//! document) for the updates an editor sends: single keystrokes, and 10 KB pastes.
//!
//! bench_validate [--updates 20000] [--rounds 5]
//!
//! Prints the median over rounds of µs per update for each kind. A/B a change by building this
//! binary at both commits and running them alternately.

use std::time::Instant;
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
        let mut per = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            for u in updates.iter() {
                let checked = chorus_server::validate::check_update(u, 2 << 20).expect("valid");
                std::hint::black_box(checked);
            }
            per.push(started.elapsed().as_secs_f64() * 1e6 / updates.len() as f64);
        }
        per.sort_by(f64::total_cmp);
        println!(
            "{name:>12}: {:.2} µs per update (median of {rounds})",
            per[rounds / 2]
        );
    }
}

/// `count` updates, each appending `chars` characters to a text, as one client types them.
fn typed(count: usize, chars: usize) -> Vec<Vec<u8>> {
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    let chunk = "x".repeat(chars);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let mut txn = doc.transact_mut();
        let len = text.get_string(&txn).len() as u32;
        text.insert(&mut txn, len, &chunk);
        out.push(txn.encode_update_v1());
    }
    out
}
