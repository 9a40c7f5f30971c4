#!/usr/bin/env bash
# Runs every Chorus test. Installs what the tests need first and says what it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

# A CI checkout builds everything once: incremental compilation would only write caches
# nobody reads (time and several GB of disk).
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

for tool in cargo rustup node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$tool not found: the tests need the Rust toolchain (rustup) and Node.js with npm" >&2
    exit 1
  fi
done

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  say "Installing redis-server and redis-cli with apt-get (the multi-node tests start real Redis servers and a 3-master cluster on free ports)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update
  $SUDO apt-get install -y redis-server
fi

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  say "Installing nginx with apt-get (the load-balancer tests run server/deploy/nginx.conf, round-robin over two nodes, on a free port as a plain process)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update
  $SUDO apt-get install -y nginx
fi

if ! command -v moto_server >/dev/null 2>&1; then
  say "Installing moto's S3 server from PyPI (pip install 'moto[server]==5.2.1'): the S3 snapshot-store tests run against it"
  python3 -m pip install --quiet 'moto[server]==5.2.1'
fi

say "Installing the stock Yjs client used by the compatibility tests (npm ci in tests/js: yjs, y-websocket, ws)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)

say "Adding the wasm32-unknown-unknown Rust target (the protocol and client crates must build for browsers)"
rustup target add wasm32-unknown-unknown

if [ ! -x /usr/bin/chromium ]; then
  say "Installing Debian's chromium for the browser tests (apt-get update; apt-get install -y chromium)"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update
  "${sudo_cmd[@]}" apt-get install -y chromium
fi

say "Installing the browser test driver (npm ci in tests/browser: playwright-core, which uses /usr/bin/chromium and downloads no browser)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

say "Checking formatting (cargo fmt --check)"
cargo fmt --all -- --check

say "Linting (cargo clippy, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

say "Linting the browser client for wasm32 (its wasm-bindgen face only compiles there)"
cargo clippy -p chorus-client --target wasm32-unknown-unknown -- -D warnings

# The same package run.sh builds for the demo page (web-demo/pkg). It compiles the protocol
# crate for wasm32 too (the client depends on it), so that needs no build of its own.
./scripts/build-wasm.sh

say "Building the chorus binary (the process tests start it, kill -9 it and restart it)"
cargo build -p chorus-server --bin chorus

say "Running all tests (unit + integration, against real sockets and processes)"
cargo test --workspace

say "Running the browser tests (node --test: real chorus processes; the demo page and its CodeMirror editor, ChorusProvider beside a stock y-websocket client, and an EventSource reader behind nginx, in headless chromium)"
(cd tests/browser && node --test --test-concurrency=1 demo.test.mjs editor.test.mjs sse.test.mjs)

say "All tests passed in $(( $(date +%s) - started ))s"
