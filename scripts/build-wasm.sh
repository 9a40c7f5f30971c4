#!/usr/bin/env bash
# Builds the browser package: client-wasm (release, wasm32) → wasm-bindgen --target web → web-demo/pkg,
# plus the Y.Doc provider (client-wasm/js) beside it, then bundles the demo's editor (esbuild) into
# web-demo/dist. Used by run.sh and test.sh; installs the wasm32 target, wasm-bindgen-cli and the
# demo's npm packages (npm ci) when missing and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*" >&2; }

# wasm-bindgen's CLI and its crate must be the same version, or the generated JS does not
# match the wasm. The crate's version is whatever Cargo.lock resolved.
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
if [ -z "$want" ]; then
  echo "wasm-bindgen not found in Cargo.lock" >&2
  exit 1
fi
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ]; then
  say "Installing wasm-bindgen-cli $want with cargo install (found: ${have:-none}); it must equal the wasm-bindgen crate in Cargo.lock. Takes ~3 minutes, once"
  # No --locked: the CLI's own lock file pins crates the registry mirror here may lack.
  cargo install wasm-bindgen-cli --version "$want"
fi

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "Adding the wasm32-unknown-unknown Rust target (rustup target add)"
  rustup target add wasm32-unknown-unknown
fi

say "Building the wasm client (chorus-client, release, wasm32-unknown-unknown, optimised for size)"
# Size over speed for the browser download; set here so the server's release build is untouched.
CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
  CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
  cargo build -p chorus-client --release --target wasm32-unknown-unknown

say "Generating the JS bindings into web-demo/pkg (wasm-bindgen $want --target web)"
wasm-bindgen --target web --out-dir web-demo/pkg \
  target/wasm32-unknown-unknown/release/chorus_client.wasm

# wasm-opt is optional and only used when it is a known-good build: Debian's binaryen (108)
# silently breaks wasm-bindgen output. Point WASM_OPT at e.g. npm binaryen@132's wasm-opt.
# Measured here: -Oz took the raw file from 648 KB to 579 KB but the gzipped one from 201 KB
# to 220 KB, and gzip is what travels, so it is off by default.
if [ -n "${WASM_OPT:-}" ]; then
  say "Optimising with $WASM_OPT -Oz"
  "$WASM_OPT" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-reference-types --enable-multivalue --enable-mutable-globals \
    -o web-demo/pkg/chorus_client_bg.wasm.opt web-demo/pkg/chorus_client_bg.wasm
  mv web-demo/pkg/chorus_client_bg.wasm.opt web-demo/pkg/chorus_client_bg.wasm
fi

wasm=web-demo/pkg/chorus_client_bg.wasm
say "wasm package ready: $wasm is $(wc -c <"$wasm") bytes, $(gzip -9c "$wasm" | wc -c) gzipped"

say "Copying the Y.Doc provider (client-wasm/js: ChorusProvider + its .d.ts) into web-demo/pkg"
cp client-wasm/js/chorus-provider.js client-wasm/js/chorus-provider.d.ts web-demo/pkg/

# The demo's editor (CodeMirror 6, y-codemirror.next, yjs) comes from npm, pinned by
# web-demo/package-lock.json, and is bundled here: the page fetches nothing from a CDN.
if [ ! -x web-demo/node_modules/.bin/esbuild ] || [ web-demo/package-lock.json -nt web-demo/node_modules/.package-lock.json ]; then
  say "Installing the demo's editor packages (npm ci in web-demo: codemirror, y-codemirror.next, yjs, esbuild)"
  (cd web-demo && npm ci --no-audit --no-fund --loglevel=error)
fi
say "Bundling the demo page (esbuild web-demo/src/app.js → web-demo/dist/app.js; the wasm glue in pkg/ stays a separate module)"
# ../pkg/chorus_client.js stays external: it finds its .wasm by import.meta.url, which must be pkg/.
# dist/lib.js: ChorusClient + ChorusProvider + yjs for pages that have no bundler (and the tests).
web-demo/node_modules/.bin/esbuild web-demo/src/app.js web-demo/src/lib.js --bundle --format=esm --minify \
  --target=es2022 --external:../pkg/chorus_client.js --outdir=web-demo/dist --log-level=warning
js=web-demo/dist/app.js
say "demo bundle ready: $js is $(wc -c <"$js") bytes, $(gzip -9c "$js" | wc -c) gzipped"
