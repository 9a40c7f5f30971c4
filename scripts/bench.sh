#!/usr/bin/env bash
# Benchmarks Chorus side by side with Hocuspocus, the y-websocket reference server and y-sweet,
# in one run on this machine, and rewrites the results block of BENCHMARKS.md.
#
#   scripts/bench.sh                      # everything, 3 repetitions, medians
#   REPS=1 SCENARIOS="fanout s1" scripts/bench.sh
#
# Peers are installed from their registries into bench-peers/ (git-ignored), never vendored:
# npm `@y/websocket-server@0.1.1`, `@hocuspocus/server@3.4.4` (the newest that installs on
# Node 20), and `cargo install y-sweet --version 0.9.1 --locked`.
# The server under test is pinned to CPU 0, the load generator (and Redis) to CPU 1.
# Servers: chorus (/y), chorus-native (/v1/ws), chorus-redis (/y on a Redis backplane),
# chorus-flush30 (/y with --flush-interval 30ms), ywebsocket, hocuspocus, ysweet. S2 and S3
# (idle sockets, large documents) run against `chorus` and the peers only: the Chorus variants
# differ in how updates are written and fanned out, which neither scenario exercises.
# A/B of builds in the same run (the one way to compare builds: runs alternate with the rest, so
# a busy machine weighs on all alike): add chorus@LABEL to SERVERS for the binary at
# bench-peers/builds/LABEL/chorus, or chorus@/path/to/chorus for any binary (served like
# `chorus`, on /y), e.g. SERVERS="chorus chorus@/tmp/before/chorus" SCENARIOS=fanout.
# The join storm (join) runs against `chorus` and the peers only, after its own floor row.
# Knobs (environment): REPS, SCENARIOS (floor fanout s1 s2 s3 s4 s5 join), SERVERS, S1_DOCS,
# S1_STEPS, S2_CONNECTIONS, S3_OPS, S3_COPIES, S3_DEADLINE, JOIN_MB, JOIN_CLIENTS, MEASURE, WARMUP.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS=$ROOT/bench-peers
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-"floor fanout s1 s2 s3 s4 s5 join"}
SERVERS=${SERVERS:-"chorus chorus-native chorus-redis chorus-flush30 ywebsocket hocuspocus ysweet"}
S1_DOCS=${S1_DOCS:-200}
S1_STEPS=${S1_STEPS:-"1,2,3,4,6,8,12,16"}
S1_NAME=${S1_NAME:-s1}   # a scaled run gets its own name (e.g. s1-50) and its own table
S2_CONNECTIONS=${S2_CONNECTIONS:-19000}
S3_OPS=${S3_OPS:-259778}
# The big document is the trace typed S3_COPIES times (37 MB at 100), built once by the
# generator (about 26 minutes on one core) and cached in bench-peers/data.
S3_COPIES=${S3_COPIES:-100}
# A server that has not delivered the trace's last edit by then is recorded as unfinished.
S3_DEADLINE=${S3_DEADLINE:-180}
# Join storm: JOIN_CLIENTS stock clients join a document of about JOIN_MB MB at once.
JOIN_MB=${JOIN_MB:-20}
JOIN_CLIENTS=${JOIN_CLIENTS:-150}
MEASURE=${MEASURE:-6}
WARMUP=${WARMUP:-2}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
# RUN=dir to add to an earlier run (the report covers everything in it).
RUN=${RUN:-$PEERS/runs/$(date -u +%Y%m%dT%H%M%SZ)}
RESULTS=$RUN/results.jsonl
mkdir -p "$RUN"
say() { printf '\n==> %s\n' "$*" >&2; }

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- install peers -------------------------------------------------------------------------
if [ ! -d "$PEERS/node/node_modules/@hocuspocus/server" ] || [ ! -d "$PEERS/node/node_modules/@y/websocket-server" ]; then
  say "npm install @y/websocket-server@0.1.1 @hocuspocus/server@3.4.4 yjs@13.6.33 into bench-peers/node"
  mkdir -p "$PEERS/node"
  [ -f "$PEERS/node/package.json" ] || echo '{"name":"chorus-bench-peers","private":true}' >"$PEERS/node/package.json"
  (cd "$PEERS/node" && npm install --no-audit --no-fund @y/websocket-server@0.1.1 @hocuspocus/server@3.4.4 yjs@13.6.33)
fi
cp scripts/bench/hocuspocus-server.mjs "$PEERS/node/"
if [ ! -x "$PEERS/y-sweet/bin/y-sweet" ]; then
  say "cargo install y-sweet --version 0.9.1 --locked --root bench-peers/y-sweet (~4 min)"
  cargo install y-sweet --version 0.9.1 --locked --root "$PEERS/y-sweet"
fi
say "cargo build --release (chorus, loadgen, bench_send_floor, bench_slow_readers, bench_redis)"
cargo build --release -p chorus-server --bin chorus -p chorus-tests --bin loadgen --bin bench_send_floor \
  --bin bench_slow_readers --bin bench_redis
CHORUS=$ROOT/target/release/chorus
# build_of chorus@X: the binary X names (a label under bench-peers/builds/, or a path).
build_of() {
  case ${1#chorus@} in
    */*) echo "${1#chorus@}" ;;
    *) echo "$PEERS/builds/${1#chorus@}/chorus" ;;
  esac
}
LOADGEN=$ROOT/target/release/loadgen

# --- servers -------------------------------------------------------------------------------
PORT=18600
SERVER_PID=""
DATA=""

version_of() {
  case $1 in
    chorus-redis) echo "$("$CHORUS" --version) + $(redis-server --version | cut -d' ' -f1-3)" ;;
    chorus@*) echo "$("$(build_of "$1")" --version) (build $(build_of "$1"))" ;;
    chorus*) "$CHORUS" --version ;;
    ywebsocket) echo "@y/websocket-server $(node -p "require('$PEERS/node/node_modules/@y/websocket-server/package.json').version")" ;;
    hocuspocus) echo "@hocuspocus/server $(node -p "require('$PEERS/node/node_modules/@hocuspocus/server/package.json').version") on node $(node --version)" ;;
    ysweet) echo "y-sweet $(ls "$PEERS"/y-sweet/.crates2.json >/dev/null 2>&1 && grep -o "y-sweet [0-9.]*" "$PEERS/y-sweet/.crates.toml" | head -1 | cut -d" " -f2) (crates.io)" ;;
  esac
}

# start NAME [keep]: starts a server pinned to SERVER_CPU; keep=1 reuses the data dir.
start() {
  local name=$1 keep=${2:-0}
  PORT=$((PORT + 1))
  if [ "$keep" != 1 ]; then DATA=$(mktemp -d "$RUN/data.XXXX"); fi
  case $name in
    chorus-redis)
      # The same node on a Redis backplane (Redis on the generator's core, default
      # appendfsync): the embedded log fsyncs every append, Redis does not.
      REDIS_PORT=$((PORT + 1000))
      taskset -c "$GEN_CPU" redis-server --port "$REDIS_PORT" --save '' --appendonly no --dir "$DATA" \
        >"$RUN/redis.log" 2>&1 &
      REDIS_PID=$!
      sleep 0.3
      RUST_LOG=warn CHORUS_REDIS_URL=redis://127.0.0.1:$REDIS_PORT CHORUS_MAX_CONNECTIONS=20000 \
        CHORUS_MAX_CONNECTIONS_PER_SECOND=100000 CHORUS_MAX_CONNECTIONS_PER_IP=0 CHORUS_MAX_MESSAGES_PER_SECOND=1000000 \
        CHORUS_MAX_MESSAGE_BYTES=67108864 CHORUS_MAX_UPDATE_BYTES=67108864 \
        taskset -c "$SERVER_CPU" "$CHORUS" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
        >"$RUN/${name//\//_}.log" 2>&1 &
      SERVER_PID=$!
      PROTO=yws URL=ws://127.0.0.1:$PORT/y
      ;;
    chorus*)
      # chorus-flush30: the same node trading up to 30 ms of latency for fewer writes.
      # chorus@X: another build for A/B in one run (see build_of).
      FLUSH=0ms; [ "$name" = chorus-flush30 ] && FLUSH=30ms
      local bin=$CHORUS; case $name in chorus@*) bin=$(build_of "$name") ;; esac
      CHORUS_FLUSH_INTERVAL=$FLUSH RUST_LOG=warn CHORUS_MAX_CONNECTIONS=20000 CHORUS_MAX_CONNECTIONS_PER_SECOND=100000 CHORUS_MAX_CONNECTIONS_PER_IP=0 \
        CHORUS_MAX_MESSAGES_PER_SECOND=1000000 CHORUS_MAX_MESSAGE_BYTES=67108864 \
        CHORUS_MAX_UPDATE_BYTES=67108864 \
        taskset -c "$SERVER_CPU" "$bin" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
        >"$RUN/${name//\//_}.log" 2>&1 &
      SERVER_PID=$!
      if [ "$name" = chorus-native ]; then PROTO=native URL=ws://127.0.0.1:$PORT/v1/ws; else PROTO=yws URL=ws://127.0.0.1:$PORT/y; fi
      ;;
    ywebsocket)
      # YPERSISTENCE (LevelDB) so that the cold-load figure means the same thing as for the others.
      HOST=127.0.0.1 PORT=$PORT YPERSISTENCE=$DATA/leveldb taskset -c "$SERVER_CPU" \
        node "$PEERS/node/node_modules/@y/websocket-server/src/server.js" >"$RUN/${name//\//_}.log" 2>&1 &
      SERVER_PID=$!
      PROTO=yws URL=ws://127.0.0.1:$PORT
      ;;
    hocuspocus)
      PORT=$PORT taskset -c "$SERVER_CPU" node "$PEERS/node/hocuspocus-server.mjs" >"$RUN/${name//\//_}.log" 2>&1 &
      SERVER_PID=$!
      PROTO=hocuspocus URL=ws://127.0.0.1:$PORT
      ;;
    ysweet)
      taskset -c "$SERVER_CPU" "$PEERS/y-sweet/bin/y-sweet" serve --host 127.0.0.1 --port "$PORT" "$DATA" \
        >"$RUN/${name//\//_}.log" 2>&1 &
      SERVER_PID=$!
      PROTO=ysweet URL=http://127.0.0.1:$PORT
      ;;
  esac
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$name did not start; see $RUN/$name.log" >&2
  return 1
}

stop() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
  if [ -n "${REDIS_PID:-}" ]; then
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
  fi
}
trap stop EXIT

# Waits until the server has used under 20 ms of CPU in each of 2 consecutive seconds (at most
# $1 seconds): servers that persist behind their answers (the reference server's LevelDB
# writes) get to finish before they are stopped and cold-loaded.
settle() {
  local limit=${1:-60} quiet=0 last now
  last=$(awk '{print $14 + $15}' "/proc/$SERVER_PID/stat" 2>/dev/null) || return 0
  for _ in $(seq "$limit"); do
    sleep 1
    now=$(awk '{print $14 + $15}' "/proc/$SERVER_PID/stat" 2>/dev/null) || return 0
    if [ $((now - last)) -lt 2 ]; then quiet=$((quiet + 1)); else quiet=0; fi
    last=$now
    [ "$quiet" -ge 2 ] && return 0
  done
  say "$SERVER_PID still busy after ${limit}s; stopping it anyway"
}

gen() { taskset -c "$GEN_CPU" "$LOADGEN" --proto "$PROTO" --url "$URL" --pid "$SERVER_PID" --out "$RESULTS" "$@"; }

# --- machine -------------------------------------------------------------------------------
{
  echo "{\"scenario\":\"machine\",\"cpu\":\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\",\"cores\":$(nproc),\"mem_mb\":$(free -m | awk '/Mem:/{print $2}'),\"kernel\":\"$(uname -r)\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
  for s in $SERVERS; do echo "{\"scenario\":\"version\",\"server\":\"$s\",\"version\":\"$(version_of "$s")\"}"; done
} >>"$RESULTS"

# S3 data: the synthetic trace's document, once and 100 times over (built once, cached).
BIG=$PEERS/data/trace-x$S3_COPIES-$S3_OPS.bin
if [[ " $SCENARIOS " == *" s3 "* ]] && [ ! -f "$BIG" ]; then
  mkdir -p "$PEERS/data"
  say "building the S3 big document (synthetic automerge-paper-shaped trace × $S3_COPIES)"
  taskset -c "$GEN_CPU" "$LOADGEN" --scenario gen-doc --copies "$S3_COPIES" --ops "$S3_OPS" --file "$BIG"
fi

for rep in $(seq "$REPS"); do
  if [[ " $SCENARIOS " == *" floor "* ]]; then
    say "[$rep/$REPS] floor: plain writes to 50 loopback sockets in the fan-out's shape (bench_send_floor)"
    taskset -c "$SERVER_CPU" "$ROOT/target/release/bench_send_floor" --reader-cpu "$GEN_CPU" \
      | tee -a "$RUN/floor.txt" | sed -n 's/^RESULT //p' >>"$RESULTS"
  fi
  if [[ " $SCENARIOS " == *" join "* ]]; then
    say "[$rep/$REPS] join floor: ${JOIN_MB} MB by plain writes to each of $JOIN_CLIENTS loopback sockets"
    taskset -c "$SERVER_CPU" "$ROOT/target/release/bench_send_floor" --reader-cpu "$GEN_CPU" \
      --join $((JOIN_MB * 1000000)) --readers "$JOIN_CLIENTS" \
      | tee -a "$RUN/floor.txt" | sed -n 's/^RESULT //p' >>"$RESULTS"
  fi
  for s in $SERVERS; do
    if [[ " $SCENARIOS " == *" fanout "* ]]; then
      say "[$rep/$REPS] $s: fan-out efficiency (1 doc, 50 readers, 2 writers × 50 updates/s)"
      start "$s"
      gen --scenario typing --name fanout --label "$s" --docs 1 --clients 52 --writers 2 \
        --chars-per-sec 50 --cursor-hz 0 --steps 1 --warmup "$WARMUP" --measure "$MEASURE" --doc-prefix "f$rep" || true
      stop
    fi
    if [[ " $SCENARIOS " == *" s1 "* ]]; then
      say "[$rep/$REPS] $s: S1 typing rooms ($S1_DOCS docs × 10 clients, steps $S1_STEPS)"
      start "$s"
      gen --scenario typing --name "$S1_NAME" --label "$s" --docs "$S1_DOCS" --clients 10 --writers 2 \
        --chars-per-sec 5 --cursor-hz 2 --steps "$S1_STEPS" --warmup "$WARMUP" --measure "$MEASURE" --doc-prefix "s$rep" || true
      stop
    fi
    variant=0; case $s in chorus-*) variant=1 ;; esac
    if [[ " $SCENARIOS " == *" s2 "* ]] && [ "$variant" = 0 ]; then
      say "[$rep/$REPS] $s: S2 idle connections ($S2_CONNECTIONS)"
      start "$s"
      gen --scenario idle --label "$s" --connections "$S2_CONNECTIONS" --doc-prefix "i$rep" || true
      stop
    fi
    if [[ " $SCENARIOS " == *" s3 "* ]] && [ "$variant" = 0 ]; then
      say "[$rep/$REPS] $s: S3 large documents"
      # The big document's name carries its size: runs with other S3_COPIES get own tables.
      big=big; [ "$S3_COPIES" = 10 ] || big=big$S3_COPIES
      start "$s"
      if [ -z "${S3_SKIP_INGEST:-}" ]; then
        gen --scenario ingest --label "$s" --ops "$S3_OPS" --doc "b4r$rep" --deadline "$S3_DEADLINE" || true
        # A fresh process for the put: one still digesting an unfinished ingest would
        # charge that backlog to the big document.
        settle 60
        stop
        start "$s" 1
      fi
      gen --scenario put --label "$s" --file "$BIG" --doc "${big}r$rep" --settle 12 || true
      settle 60
      stop
      if [ -z "${S3_SKIP_INGEST:-}" ]; then
        start "$s" 1
        # Up to 45 s without content: the reference server sends a persisted document after
        # its sync (the 100x one about 20 s later); a load ends as soon as all has arrived.
        gen --scenario load --label "$s" --doc "b4r$rep" --ops "$S3_OPS" --quiet-ms 45000 || true
        stop
      fi
      start "$s" 1
      gen --scenario load --label "$s" --doc "${big}r$rep" --file "$BIG" --quiet-ms 45000 || true
      stop
    fi
    if [[ " $SCENARIOS " == *" join "* ]] && [ "$variant" = 0 ]; then
      say "[$rep/$REPS] $s: join storm ($JOIN_CLIENTS clients join a ${JOIN_MB} MB document at once)"
      # A fresh process: the storm's peak RSS is measured against what it held before.
      start "$s"
      gen --scenario join --label "$s" --doc "j$rep" --mb "$JOIN_MB" --clients "$JOIN_CLIENTS" || true
      stop
    fi
  done
done

if [[ " $SCENARIOS " == *" s4 "* ]]; then
  say "S4 slow readers (Chorus only: bench_slow_readers)"
  taskset -c "$SERVER_CPU" "$ROOT/target/release/bench_slow_readers" 2>&1 | tee "$RUN/s4.txt"
fi
if [[ " $SCENARIOS " == *" s5 "* ]]; then
  say "S5 two nodes over Redis (Chorus only: bench_redis)"
  taskset -c "$SERVER_CPU" "$ROOT/target/release/bench_redis" 2>&1 | tee "$RUN/s5.txt"
fi

say "results: $RESULTS"
python3 scripts/bench/report.py "$RUN" BENCHMARKS.md
