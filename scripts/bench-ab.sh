#!/usr/bin/env bash
# A/B of the fan-out hot path between two chorus binaries: bench.sh's fan-out scenario (1 doc,
# 50 readers, 2 writers × 50 updates/s, stock y-websocket and native), alternating A and B in
# every repetition so that a busy machine weighs on both alike. Prints server CPU per 1,000
# deliveries per run and the medians.
#
#   A=/path/to/chorus-before B=target/release/chorus scripts/bench-ab.sh
#
# Knobs (environment): REPS (4), MEASURE (20 s per run), WARMUP (2), MODES ("yws native"),
# LOADGEN (target/release/loadgen). The server runs on CPU 0, the load generator on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${A:?A=path of the first chorus binary}
B=${B:?B=path of the second chorus binary}
LOADGEN=${LOADGEN:-target/release/loadgen}
REPS=${REPS:-4}
MEASURE=${MEASURE:-20}
WARMUP=${WARMUP:-2}
MODES=${MODES:-"yws native"}
RUN=$(mktemp -d /tmp/chorus-ab.XXXX)
OUT=$RUN/results.jsonl
PORT=19600
SERVER_PID=""
stop() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop EXIT

for rep in $(seq "$REPS"); do
  for mode in $MODES; do
    for which in A B; do
      bin=$A; [ "$which" = B ] && bin=$B
      PORT=$((PORT + 1))
      data=$(mktemp -d "$RUN/data.XXXX")
      CHORUS_FLUSH_INTERVAL=0ms RUST_LOG=warn CHORUS_MAX_CONNECTIONS=20000 \
        CHORUS_MAX_CONNECTIONS_PER_SECOND=100000 CHORUS_MAX_CONNECTIONS_PER_IP=0 \
        CHORUS_MAX_MESSAGES_PER_SECOND=1000000 CHORUS_MAX_MESSAGE_BYTES=67108864 \
        CHORUS_MAX_UPDATE_BYTES=67108864 \
        taskset -c 0 "$bin" serve --listen "127.0.0.1:$PORT" --data-dir "$data" >"$RUN/server.log" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
        sleep 0.1
      done
      path=/y; [ "$mode" = native ] && path=/v1/ws
      taskset -c 1 "$LOADGEN" --proto "$mode" --url "ws://127.0.0.1:$PORT$path" --pid "$SERVER_PID" \
        --out "$OUT" --scenario typing --name fanout --label "$which-$mode" --docs 1 --clients 52 \
        --writers 2 --chars-per-sec 50 --cursor-hz 0 --steps 1 --warmup "$WARMUP" \
        --measure "$MEASURE" --doc-prefix "ab$rep" >/dev/null || true
      stop
      rm -rf "$data"
    done
  done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("scenario") == "fanout" and "base_cpu_ms_per_1k" in r:
        runs.setdefault(r["server"], []).append(r["base_cpu_ms_per_1k"])
print(f"{'run':12} {'median':>8}  server CPU ms per 1,000 deliveries, each run")
for name in sorted(runs):
    v = runs[name]
    print(f"{name:12} {statistics.median(v):8.2f}  " + " ".join(f"{x:.2f}" for x in v))
EOF
echo "results: $OUT"
