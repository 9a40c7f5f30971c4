#!/usr/bin/env bash
# Profiles a release Chorus node under the S1 typing load (outside the data flow: it samples
# the server while loadgen plays the clients). Server on CPU 0, generator on CPU 1, `perf
# record` for 10 s in the middle of a 20 s step; prints the hottest symbols (self time), then
# the same folded by caller for the top entries.
#
#   scripts/bench/profile.sh                    # embedded log, S1 base rate
#   BACKPLANE=redis STEP=2 scripts/bench/profile.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-peers/profile}
mkdir -p "$OUT"
DATA=$(mktemp -d "$OUT/data.XXXX")
PORT=${PORT:-18999}
ENV=(RUST_LOG=warn CHORUS_MAX_CONNECTIONS=20000 CHORUS_MAX_CONNECTIONS_PER_SECOND=100000)
REDIS_PID=""
if [ "${BACKPLANE:-embedded}" = redis ]; then
  taskset -c 1 redis-server --port $((PORT + 1)) --save '' --appendonly no --dir "$DATA" >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  sleep 0.3
  ENV+=(CHORUS_REDIS_URL=redis://127.0.0.1:$((PORT + 1)))
fi
env "${ENV[@]}" taskset -c 0 target/release/chorus serve --listen 127.0.0.1:$PORT --data-dir "$DATA" >"$OUT/chorus.log" 2>&1 &
PID=$!
trap 'kill $PID ${REDIS_PID} 2>/dev/null || true' EXIT
sleep 1
taskset -c 1 target/release/loadgen --proto yws --url ws://127.0.0.1:$PORT/y --pid $PID \
  --scenario typing --name profile --label chorus --docs 200 --clients 10 --writers 2 \
  --chars-per-sec 5 --cursor-hz 2 --steps "${STEP:-1}" --warmup 3 --measure 20 &
LG=$!
sleep 10
perf record -e cpu-clock -F 499 --call-graph dwarf,8192 -p $PID -o "$OUT/perf.data" -- sleep 10 >"$OUT/perf-record.log" 2>&1; echo "perf record exit $?" >&2
wait $LG || true
perf report -i "$OUT/perf.data" --no-children --percent-limit 1 --stdio --sort dso,symbol -g none 2>/dev/null \
  | grep -v '^$' | grep -v '^#' | head -50
echo "--- inclusive (children), top entries"
perf report -i "$OUT/perf.data" --children --percent-limit 4 --stdio --sort symbol -g none 2>/dev/null \
  | grep -v '^$' | grep -v '^#' | head -50
