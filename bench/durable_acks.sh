#!/usr/bin/env bash
# What `redis.wait_replicas` costs: acks/s and latency of client sends into a stream, and the
# rate and delivery latency of /send calls to a channel with history, with WAIT off (0, with and
# without the kept copies of acked sends, `inbound.keep_unconfirmed_entries`) and on (1),
# against a Redis primary with one `replicaof` replica, one gateway replica.
#
#   bench/durable_acks.sh [--out DIR]
#
# Redis (both), the gateway on CPU 0, the load generator on CPU 1 (taskset), as bench/run.sh.
# Binaries: target/release (built here unless WSBRIDGE_BIN / LOADGEN_BIN are given).
# Results: DIR/<setting>-<scenario>.json (loadgen reports) and a summary on standard output.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/bench/durable-$(date -u +%Y%m%dT%H%M%SZ)
[ "${1:-}" = --out ] && OUT=$2
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
. bench/lib.sh
SECRET=bench-secret

PRIMARY=$(free_port); REPLICA=$(free_port)
redis_on_cpu0 "$REPLICA"
redis_on_cpu0 "$PRIMARY" # REDIS_PID: the primary's
redis-cli -p "$REPLICA" replicaof 127.0.0.1 "$PRIMARY" >/dev/null
wait_for sh -c "redis-cli -p $REPLICA info replication | grep -q master_link_status:up"

SETTINGS=("0 0" "0 100000" "1 100000") # wait_replicas, keep_unconfirmed_entries
for setting in "${SETTINGS[@]}"; do
  read -r wait keep <<<"$setting"
  run=wait$wait-keep$keep
  p=$(free_port); q=$(free_port)
  WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
  WSBRIDGE__REDIS__URL=redis://127.0.0.1:$PRIMARY WSBRIDGE__AUTH__JWT_SECRET=$SECRET \
  WSBRIDGE__REDIS__WAIT_REPLICAS=$wait WSBRIDGE__INBOUND__KEEP_UNCONFIRMED_ENTRIES=$keep \
  WSBRIDGE__REDIS__PREFIX=bench$wait-$keep \
  WSBRIDGE__LIMITS__MAX_CONNECTIONS=100000 WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND=1000000 \
  WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES=1000000 RUST_LOG=warn \
    taskset -c 0 "$GW" --config config/wsbridge.toml >>"$OUT/wsbridge-$run.log" 2>&1 &
  gw=$!
  PIDS+=("$gw")
  wait_for curl -sf "http://127.0.0.1:$q/readyz"
  common=(--target wsbridge --ws "ws://127.0.0.1:$p/ws" --api "http://127.0.0.1:$q" --pids "$gw"
          --redis-pid "$REDIS_PID" --jwt-secret "$SECRET" --quiet)
  taskset -c 1 "$LOADGEN" "${common[@]}" --scenario inbound --clients 1000 --messages 100 \
    --window 16 --json "$OUT/$run-inbound.json"
  curl -sf "http://127.0.0.1:$q/metrics" | grep '^wsbridge_stream_append_seconds' \
    >"$OUT/$run-append-seconds.txt" || true
  taskset -c 1 "$LOADGEN" "${common[@]}" --scenario inbound --clients 10 --messages 1000 \
    --window 1 --json "$OUT/$run-serial.json"
  taskset -c 1 "$LOADGEN" "${common[@]}" --scenario fanout --clients 10 --channel room:bench \
    --messages 5000 --rate 0 --batch 1 --json "$OUT/$run-send.json"
  # The gateway's own append latency (request taken → answer, WAIT included) and the WAITs
  # Redis ran, for the summary.
  redis-cli -p "$PRIMARY" info commandstats | grep -E '^cmdstat_wait:' >"$OUT/$run-commandstats.txt" || true
  redis-cli -p "$PRIMARY" config resetstat >/dev/null
  kill "$gw"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def quantiles(path):
    buckets, count = [], 0
    for line in open(path):
        name, value = line.rsplit(' ', 1)
        if '_bucket{le="' in name and '+Inf' not in name:
            buckets.append((float(name.split('le="')[1].split('"')[0]), float(value)))
        elif name.endswith('_count'):
            count = float(value)
    def q(p):
        return next((le for le, c in buckets if c >= p * count), float('inf')) * 1000
    return q(0.5), q(0.99)
print("| wait_replicas | keep_unconfirmed_entries | acks/s, 1,000 clients x 16 in flight | its append latency p50 / p99 (gateway histogram, upper bucket bounds) | acks/s, 10 clients x 1 in flight | /send calls/s, one at a time, history channel | its delivery latency p50 / p99 | WAIT calls |")
print("|---|---|---|---|---|---|---|---|")
for wait, keep in ((0, 0), (0, 100000), (1, 100000)):
    run = f"{out}/wait{wait}-keep{keep}"
    inbound = json.load(open(f"{run}-inbound.json"))
    serial = json.load(open(f"{run}-serial.json"))
    send = json.load(open(f"{run}-send.json"))
    p50, p99 = quantiles(f"{run}-append-seconds.txt")
    waits = open(f"{run}-commandstats.txt").read().strip()
    calls = waits.split('calls=')[1].split(',')[0] if waits else '0'
    print(f"| {wait} | {keep if wait == 0 else '(not used)'} | {inbound['deliveries_per_s']:,.0f} | {p50:g} / {p99:g} ms | {serial['deliveries_per_s']:,.0f} |"
          f" {send['publish_calls'] / send['publish_s']:,.0f} | {send['latency_ms']['p50']} / {send['latency_ms']['p99']} ms | {calls} |")
PY
