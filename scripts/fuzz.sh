#!/usr/bin/env bash
# Runs the cargo-fuzz targets in server/fuzz by hand (not part of CI; `cargo test` replays the
# committed corpus through the same target functions on every run).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, all three targets
#
# The committed seeds (server/fuzz/corpus/<target>/) are read; the inputs libFuzzer finds and
# keeps go to the ignored server/fuzz/work/<target>/, so later runs start from them. A crash is
# saved under server/fuzz/artifacts/<target>/ and the run stops: fix it at its root, then copy
# the input into the committed corpus as `regression-<what>` (cargo test replays it).
set -euo pipefail
cd "$(dirname "$0")/../server"

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(native_frame yjs_message apply)

if ! command -v cargo-fuzz >/dev/null; then
  echo "==> installing cargo-fuzz 0.13.2 (cargo install)"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi

# cargo-fuzz passes sanitizer flags that need nightly; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them.
export RUSTC_BOOTSTRAP=1
echo "==> building the fuzz targets (release with debug assertions and overflow checks, AddressSanitizer)"
cargo fuzz build -O -a

for t in "${targets[@]}"; do
  echo "==> fuzzing $t for ${seconds}s"
  log="$(mktemp)"
  mkdir -p "fuzz/work/$t"
  cargo fuzz run -O -a "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "$log" | grep -E "^(#[0-9]+.*(pulse|DONE)|stat::number_of_executed_units|==[0-9]+==ERROR|SUMMARY)" || true
  execs="$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)"
  echo "$t: $execs executions in ${seconds}s"
  if grep -qE "^==[0-9]+==ERROR|panicked at|deadly signal" "$log"; then
    echo "$t: CRASH (input saved under server/fuzz/artifacts/$t/); log: $log" >&2
    exit 1
  fi
  rm -f "$log"
done
