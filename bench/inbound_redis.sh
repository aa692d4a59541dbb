#!/usr/bin/env bash
# Redis's CPU per stored inbound entry: the gateway's appends (once per frame id, the dedupe
# window on) against a bare pipelined XADD of the same seven fields with the same MAXLEN ~, on
# the same Redis, in one run. Also the gateway's CPU per entry and the acks/s.
#
#   bench/inbound_redis.sh [--out DIR] [--runs N]
#
# Redis and the gateway on CPU 0, the load generator and redis-benchmark on CPU 1 (taskset).
# Gateway load: 1,000 clients x 100 sends, 16 in flight each (loadgen --scenario inbound).
# Bare XADD: redis-benchmark, 100,000 XADDs, pipelines of 64 from 8 connections.
# Binaries: target/release (built here unless WSBRIDGE_BIN / LOADGEN_BIN are given).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/bench/inbound-redis-$(date -u +%Y%m%dT%H%M%SZ)
RUNS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
. bench/lib.sh
SECRET=bench-secret

PORT=$(free_port)
redis_on_cpu0 "$PORT"

p=$(free_port); q=$(free_port)
WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
WSBRIDGE__REDIS__URL=redis://127.0.0.1:$PORT WSBRIDGE__AUTH__JWT_SECRET=$SECRET \
WSBRIDGE__LIMITS__MAX_CONNECTIONS=100000 WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND=1000000 \
WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES=1000000 RUST_LOG=warn \
  taskset -c 0 "$GW" --config config/wsbridge.toml >>"$OUT/wsbridge.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_for curl -sf "http://127.0.0.1:$q/readyz"

# A gateway entry's fields, as sizes go: connection, user, data, encoding, id, replica, ts.
FIELDS=(connection r1.1a2b3c.123 user user-123 data '{"n":123,"text":"hello, how are you?"}'
        encoding json id c-12345 replica r1 ts 1700000000000)
# Every run starts on an empty Redis (FLUSHALL: the streams, and the dedupe keys, since the load
# generator's users and frame ids are the same each run and would be answered from them), after
# one unreported warm-up of both.
fresh_streams() { redis-cli -p "$PORT" flushall >/dev/null; }
taskset -c 1 "$LOADGEN" --target wsbridge --ws "ws://127.0.0.1:$p/ws" --api "http://127.0.0.1:$q" \
  --jwt-secret "$SECRET" --quiet --scenario inbound --clients 1000 --messages 10 --window 16 >/dev/null
taskset -c 1 redis-benchmark -p "$PORT" -n 20000 -P 64 -c 8 -q \
  XADD bench:bare MAXLEN '~' 100000 '*' "${FIELDS[@]}" >/dev/null 2>&1
for run in $(seq 1 "$RUNS"); do
  fresh_streams
  taskset -c 1 "$LOADGEN" --target wsbridge --ws "ws://127.0.0.1:$p/ws" --api "http://127.0.0.1:$q" \
    --pids "$GW_PID" --redis-pid "$REDIS_PID" --jwt-secret "$SECRET" --quiet \
    --scenario inbound --clients 1000 --messages 100 --window 16 --json "$OUT/gateway-$run.json"
  before=$(cpu_s "$REDIS_PID")
  start=$(date +%s.%N)
  taskset -c 1 redis-benchmark -p "$PORT" -n 100000 -P 64 -c 8 -q \
    XADD bench:bare MAXLEN '~' 100000 '*' "${FIELDS[@]}" >"$OUT/bare-$run.txt" 2>&1
  end=$(date +%s.%N)
  after=$(cpu_s "$REDIS_PID")
  # Redis CPU seconds before and after, wall clock at start and end.
  echo "$before $after $start $end" >"$OUT/bare-$run.times"
done
redis-cli -p "$PORT" info commandstats >"$OUT/commandstats.txt"

python3 - "$OUT" "$RUNS" <<'PY'
import json, sys
out, runs = sys.argv[1], int(sys.argv[2])
print("| run | gateway: acks/s | Redis CPU µs / entry | gateway CPU µs / entry | bare XADD: entries/s | Redis CPU µs / entry | Redis ratio gateway / bare |")
print("|---|---|---|---|---|---|---|")
for run in range(1, runs + 1):
    g = json.load(open(f"{out}/gateway-{run}.json"))
    before, after, start, end = map(float, open(f"{out}/bare-{run}.times").read().split())
    b = {"entries": 100_000, "redis_cpu_s": after - before, "elapsed_s": end - start}
    entries = 100_000
    g_redis = g["redis_cpu_s"] / entries * 1e6
    g_gw = g["gateway_cpu_s"] / entries * 1e6
    b_redis = b["redis_cpu_s"] / b["entries"] * 1e6
    print(f"| {run} | {g['deliveries_per_s']:,.0f} | {g_redis:.2f} | {g_gw:.2f} | {b['entries'] / b['elapsed_s']:,.0f} | {b_redis:.2f} | {g_redis / b_redis:.2f} |")
PY
