#!/usr/bin/env bash
# Fan-out over worker threads: one replica fanning a burst of messages out to one channel, with
# 1 worker thread (the gateway on CPU 0), and with 2 (CPUs 0 and 1), the latter both without
# fan-out lanes (outbound.fanout_shards = 1: the dispatcher finds and writes to every recipient)
# and with one lane per worker (the default). Redis on CPU 0; the load generator on CPU 1, so
# with 2 workers the gateway shares CPU 1 with it: this 2-core box cannot give a second worker a
# core of its own, and the figures say what it gets anyway.
#
#   bench/scaling.sh [--out DIR] [--clients N] [--messages M] [--runs R] [--before BIN]
#
# --before BIN adds the burst and paced rows for an older gateway binary (one without fan-out
# lanes or server.worker_threads: its worker threads follow the CPUs taskset gives it), run in
# turn with the others, with the reference config of its own tree (BIN/../../config/wsbridge.toml,
# or --before-config FILE).
#
# Defaults: 5,000 clients, 200 messages as fast as the publisher goes (1,000,000 deliveries a
# run), 3 runs of each setting, alternating; the same paced at 40 messages/s (200,000
# deliveries/s asked: more than one worker writes directly here). Then, with 2 workers and 2 lanes, the 1:1 case
# (loadgen --scenario direct: 1,000 clients, one message to each per round, 100 per call) with
# the dispatcher writing them itself (fanout_lane_min_recipients 256, the default) and with every
# message handed to the lanes (0). Reports, per setting, deliveries/s, gateway CPU µs per
# delivery, p50/p99 latency, the load generator's CPU (the median run, all runs listed), and, from
# the replica's own histograms, the dispatcher's µs per pub/sub message and the lanes' µs per
# delivery, as a markdown table in DIR/results.md. Binaries: target/release (built here unless
# WSBRIDGE_BIN / LOADGEN_BIN are given).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/bench/scaling-$(date -u +%Y%m%dT%H%M%SZ)
CLIENTS=5000
MESSAGES=200
BEFORE=
BEFORE_CONFIG=
PACED_RATE=40
RUNS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --messages) MESSAGES=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --before) BEFORE=$2; shift 2 ;;
    --before-config) BEFORE_CONFIG=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$BEFORE" ] && [ -z "$BEFORE_CONFIG" ]; then
  BEFORE_CONFIG=$(dirname "$BEFORE")/../../config/wsbridge.toml
fi
. bench/lib.sh

PORT=$(free_port)
redis_on_cpu0 "$PORT"

# setting name, worker threads, fan-out shards, fanout_lane_min_recipients, gateway CPUs, scenario
SETTINGS=("1-worker 1 1 256 0 fanout" "2-workers-no-lanes 2 1 256 0,1 fanout"
          "2-workers-2-lanes 2 2 256 0,1 fanout"
          "paced-1-worker 1 1 256 0 paced" "paced-2-workers-no-lanes 2 1 256 0,1 paced"
          "paced-2-workers-2-lanes 2 2 256 0,1 paced"
          "direct-dispatcher-writes 2 2 256 0,1 direct" "direct-lanes-write 2 2 0 0,1 direct")

run_setting() {
  local name=$1 workers=$2 shards=$3 min=$4 cpus=$5 scenario=$6 run=$7
  local p q load
  p=$(free_port); q=$(free_port)
  WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
  WSBRIDGE__REDIS__URL=redis://127.0.0.1:$PORT WSBRIDGE__REDIS__PREFIX="scaling-$name-$run" \
  WSBRIDGE__SERVER__WORKER_THREADS=$workers WSBRIDGE__OUTBOUND__FANOUT_SHARDS=$shards \
  WSBRIDGE__OUTBOUND__FANOUT_LANE_MIN_RECIPIENTS=$min \
  RUST_LOG=warn taskset -c "$cpus" "$GW" --config config/wsbridge.toml >>"$OUT/$name.log" 2>&1 &
  local gw=$!
  PIDS+=("$gw")
  wait_for curl -sf "http://127.0.0.1:$q/readyz"
  run_load "$name" "$scenario" "$run" "$gw" "$p" "$q"
}

# The older binary (--before): the same load, no new keys.
run_before() {
  local name=$1 cpus=$2 scenario=$3 run=$4
  local p q
  p=$(free_port); q=$(free_port)
  WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
  WSBRIDGE__REDIS__URL=redis://127.0.0.1:$PORT WSBRIDGE__REDIS__PREFIX="scaling-$name-$run" \
  RUST_LOG=warn taskset -c "$cpus" "$BEFORE" --config "$BEFORE_CONFIG" >>"$OUT/$name.log" 2>&1 &
  local gw=$!
  PIDS+=("$gw")
  wait_for curl -sf "http://127.0.0.1:$q/readyz"
  run_load "$name" "$scenario" "$run" "$gw" "$p" "$q"
}

run_load() {
  local name=$1 scenario=$2 run=$3 gw=$4 p=$5 q=$6
  local load
  if [ "$scenario" = fanout ]; then
    load=(--scenario fanout --clients "$CLIENTS" --messages "$MESSAGES")
  elif [ "$scenario" = paced ]; then
    load=(--scenario fanout --clients "$CLIENTS" --messages "$MESSAGES" --rate "$PACED_RATE")
  else
    load=(--scenario direct --clients 1000 --messages "$MESSAGES" --batch 100)
  fi
  taskset -c 1 "$LOADGEN" --target wsbridge --ws "ws://127.0.0.1:$p/ws" --api "http://127.0.0.1:$q" \
    --pids "$gw" --quiet "${load[@]}" --json "$OUT/$name-$run.json" >/dev/null
  curl -sf "http://127.0.0.1:$q/metrics" >"$OUT/$name-$run.metrics"
  kill "$gw"; wait "$gw" 2>/dev/null || true
}

uptime >"$OUT/load.txt"
for run in $(seq 1 "$RUNS"); do
  for s in "${SETTINGS[@]}"; do
    # shellcheck disable=SC2086
    run_setting $s "$run"
  done
  if [ -n "$BEFORE" ]; then
    run_before before-1-worker 0 fanout "$run"
    run_before before-2-workers 0,1 fanout "$run"
    run_before paced-before-1-worker 0 paced "$run"
    run_before paced-before-2-workers 0,1 paced "$run"
  fi
done
uptime >>"$OUT/load.txt"

python3 - "$OUT" "$RUNS" "$BEFORE" <<'PY'
import json, sys, re
out, runs, before = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names = ["1-worker", "2-workers-no-lanes", "2-workers-2-lanes", "paced-1-worker", "paced-2-workers-no-lanes",
         "paced-2-workers-2-lanes", "direct-dispatcher-writes", "direct-lanes-write"]
if before:
    names += ["before-1-worker", "before-2-workers", "paced-before-1-worker", "paced-before-2-workers"]
def sample(text, name):
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
rows = {}
for n in names:
    rs = []
    for r in range(1, runs + 1):
        j = json.load(open(f"{out}/{n}-{r}.json"))
        assert j["exact"], f"{n}: not every delivery exact"
        t = open(f"{out}/{n}-{r}.metrics").read()
        d = sample(t, "wsbridge_deliveries_total") or j["delivered_total"]
        j["dispatch_us_per_message"] = 1e6 * sample(t, "wsbridge_dispatch_seconds_sum") / max(1.0, sample(t, "wsbridge_pubsub_received_total"))
        j["lane_us_per_delivery"] = 1e6 * sample(t, "wsbridge_fanout_lane_seconds_sum") / max(1.0, d)
        rs.append(j)
    rs.sort(key=lambda r: r["deliveries_per_s"])
    rows[n] = rs
def all_runs(rs):
    return ", ".join(f"{r['deliveries_per_s']:,.0f}" for r in rs)
def ms(v):
    return "-" if v is None else f"{v:.1f}"
base = rows["1-worker"][runs // 2]["deliveries_per_s"]
lines = ["| setting | deliveries/s (median) | × 1 worker | gateway CPU µs/delivery | dispatcher µs/message | lanes µs/delivery | p50 ms | p99 ms | loadgen CPU s | all runs, deliveries/s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for n in names:
    m = rows[n][runs // 2]
    lines.append(f"| {n} | {m['deliveries_per_s']:,.0f} | {m['deliveries_per_s']/base:.2f}× | "
                 f"{m['gateway_cpu_us_per_delivery']:.2f} | {m['dispatch_us_per_message']:.1f} | {m['lane_us_per_delivery']:.2f} | "
                 f"{ms(m['latency_ms']['p50'])} | {ms(m['latency_ms']['p99'])} | "
                 f"{m['loadgen_cpu_s']:.1f} | {all_runs(rows[n])} |")
text = "\n".join(lines) + "\n"
open(f"{out}/results.md", "w").write(text)
print(text)
PY
cat "$OUT/load.txt"
