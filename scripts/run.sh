#!/usr/bin/env bash
# Runs a Chorus node with its embedded default (no Redis): builds what it needs, then serves
# http://127.0.0.1:8080 (override with flags, e.g. ./scripts/run.sh --listen 0.0.0.0:9000).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi

if [ -d web-demo ]; then
  # The demo page needs the browser client: client-wasm → web-demo/pkg. The script installs the
  # wasm32 target and wasm-bindgen-cli (at Cargo.lock's wasm-bindgen version) if missing.
  ./scripts/build-wasm.sh
fi

say "Building the chorus server (release; the first build takes a few minutes)"
cargo build --release -p chorus-server --bin chorus

static_args=()
if [ -d web-demo ]; then
  static_args=(--static-dir web-demo)
fi

say "Starting chorus: embedded log and snapshots under --data-dir (default ./chorus-data); demo at http://127.0.0.1:8080/ (unless --listen says otherwise); Ctrl-C stops it cleanly"
exec target/release/chorus serve "${static_args[@]}" "$@"
