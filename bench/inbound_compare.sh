#!/usr/bin/env bash
# Inbound against Socket.IO: the same clients send the same messages, the same number in flight,
# to wsbridge (one replica) and to the seeds' design, a socket.io emit with an ack callback whose
# handler XADDs the message to a stream (bench/peers/socketio/server.mjs, one node process).
# Reports acks/s, acks per gateway CPU-second, Redis CPU per entry, and the ratios
# wsbridge / socket.io, from one run.
#
#   bench/inbound_compare.sh [--out DIR] [--runs N] [--clients N] [--messages N] [--window N]
#
# Three targets, each with its own fresh Redis: wsbridge storing once per frame id (the
# default, inbound.dedupe_window_seconds = 120), wsbridge without that (window 0: a plain XADD,
# as socket.io does), and socket.io (no dedupe: the seeds' design). Every Redis and every
# gateway on CPU 0, the load generator on CPU 1 (taskset). Default load: 1,000 clients x 200
# sends, 16 in flight each (loadgen --scenario inbound). Each target gets one unreported warm-up,
# then the runs go round the targets in turn, each run into a stream of its own (r1, r2, ...),
# so nothing is flushed between runs. After each run the stream must have had exactly one entry
# added per ack (XINFO STREAM entries-added), or the script fails.
# Binaries: target/release (built here unless WSBRIDGE_BIN / LOADGEN_BIN are given); the
# socket.io peer is installed from the committed lock file into DIR/socketio.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/bench/inbound-compare-$(date -u +%Y%m%dT%H%M%SZ)
RUNS=3 CLIENTS=1000 MESSAGES=200 WINDOW=16
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --messages) MESSAGES=$2; shift 2 ;;
    --window) WINDOW=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for n in "$RUNS" "$CLIENTS" "$MESSAGES" "$WINDOW"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench/inbound_compare.sh: expected a positive number, got $n" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
command -v npm >/dev/null || { echo "bench/inbound_compare.sh: needs node and npm (apt-get install nodejs npm)" >&2; exit 1; }
. bench/lib.sh
bench/peers/socketio/install.sh "$OUT/socketio" >>"$OUT/install.log" 2>&1
cat /proc/loadavg >"$OUT/loadavg-start"

STREAMS=warm$(seq -f ',r%g' 1 "$RUNS" | tr -d '\n')
TARGETS=(wsbridge-once wsbridge-plain socketio)
declare -A REDIS_PORT REDIS_PIDS GW_PID WS API
for t in "${TARGETS[@]}"; do
  port=$(free_port)
  redis_on_cpu0 "$port"
  REDIS_PORT[$t]=$port
  REDIS_PIDS[$t]=$REDIS_PID
  p=$(free_port); q=$(free_port)
  case "$t" in
    socketio)
      taskset -c 0 node "$OUT/socketio/server.mjs" --port "$p" --api-port "$q" \
        --redis "redis://127.0.0.1:$port" --streams "$STREAMS" >>"$OUT/$t.log" 2>&1 &
      GW_PID[$t]=$!
      PIDS+=("${GW_PID[$t]}")
      WS[$t]=ws://127.0.0.1:$p
      wait_for curl -sf "http://127.0.0.1:$q/healthz"
      ;;
    *)
      window=120; [ "$t" = wsbridge-plain ] && window=0
      WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
      WSBRIDGE__REDIS__URL=redis://127.0.0.1:$port WSBRIDGE__INBOUND__STREAMS=$STREAMS \
      WSBRIDGE__INBOUND__DEDUPE_WINDOW_SECONDS=$window \
      WSBRIDGE__LIMITS__MAX_CONNECTIONS=100000 WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND=1000000 \
      WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES=1000000 RUST_LOG=warn \
        taskset -c 0 "$GW" --config config/wsbridge.toml >>"$OUT/$t.log" 2>&1 &
      GW_PID[$t]=$!
      PIDS+=("${GW_PID[$t]}")
      WS[$t]=ws://127.0.0.1:$p/ws
      wait_for curl -sf "http://127.0.0.1:$q/readyz"
      ;;
  esac
  API[$t]=http://127.0.0.1:$q
done

# One loadgen run of target $1 into stream $2; more arguments are passed on.
send() {
  local t=$1 stream=$2; shift 2
  local kind=wsbridge; [ "$t" = socketio ] && kind=socketio
  taskset -c 1 "$LOADGEN" --target "$kind" --ws "${WS[$t]}" --api "${API[$t]}" --quiet --scenario inbound \
    --clients "$CLIENTS" --window "$WINDOW" --stream "$stream" "$@"
}
# The stream of target $1 named $2: "entries-added length".
stream_counts() {
  redis-cli -p "${REDIS_PORT[$1]}" xinfo stream "wsbridge:in:$2" |
    awk 'prev == "entries-added" { added = $0 } prev == "length" { len = $0 } { prev = $0 } END { print added, len }'
}

for t in "${TARGETS[@]}"; do
  send "$t" warm --messages 10 >/dev/null
done
for run in $(seq 1 "$RUNS"); do
  for t in "${TARGETS[@]}"; do
    send "$t" "r$run" --messages "$MESSAGES" --pids "${GW_PID[$t]}" --redis-pid "${REDIS_PIDS[$t]}" \
      --json "$OUT/$t-$run.json" >"$OUT/$t-$run.txt" 2>&1 \
      || { echo "bench/inbound_compare.sh: $t run $run was not exact, see $OUT/$t-$run.txt" >&2; exit 1; }
    stream_counts "$t" "r$run" >"$OUT/$t-$run.stream"
  done
done
cat /proc/loadavg >"$OUT/loadavg-end"
for t in "${TARGETS[@]}"; do
  { echo "# $t: the newest entry of wsbridge:in:r$RUNS"
    redis-cli -p "${REDIS_PORT[$t]}" xrevrange "wsbridge:in:r$RUNS" + - count 1; } >>"$OUT/entries.txt"
done

python3 - "$OUT" "$RUNS" "$CLIENTS" "$MESSAGES" "$WINDOW" <<'PY' | tee "$OUT/results.md"
import json, statistics, sys
out, runs, clients, messages, window = sys.argv[1], *map(int, sys.argv[2:])
names = {"wsbridge-once": "wsbridge, once per id", "wsbridge-plain": "wsbridge, no dedupe",
         "socketio": "socket.io emit + ack, XADD"}
expected = clients * messages
rows = {t: [] for t in names}
for run in range(1, runs + 1):
    for t in names:
        g = json.load(open(f"{out}/{t}-{run}.json"))
        added, length = map(int, open(f"{out}/{t}-{run}.stream").read().split())
        acks = g["delivered_total"]
        if acks != expected or added != acks:
            sys.exit(f"{t} run {run}: {acks} acks, {added} entries added, {expected} expected")
        rows[t].append({"acks_s": g["deliveries_per_s"], "per_cpu_s": acks / g["gateway_cpu_s"] if g["gateway_cpu_s"] else 0,
                        "gw_us": g["gateway_cpu_s"] / acks * 1e6,
                        "redis_us": g["redis_cpu_s"] / added * 1e6, "added": added})
print(f"{clients:,} clients x {messages} sends, {window} in flight each; {runs} runs; "
      f"load average {open(out + '/loadavg-start').read().split()[0]} at start, "
      f"{open(out + '/loadavg-end').read().split()[0]} at end\n")
print("| target | run | acks/s | acks per gateway CPU-s | gateway CPU µs / ack | Redis CPU µs / entry | entries added |")
print("|---|---|---|---|---|---|---|")
for t, name in names.items():
    for run, r in enumerate(rows[t], 1):
        print(f"| {name} | {run} | {r['acks_s']:,.0f} | {r['per_cpu_s']:,.0f} | {r['gw_us']:.1f} | {r['redis_us']:.2f} | {r['added']:,} |")
med = lambda t, k: statistics.median(r[k] for r in rows[t])
# A run too short for the 10 ms CPU clock of /proc can read 0 s: no ratio then.
ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
print("\nMedians over the runs, and wsbridge / socket.io:\n")
print("| target | acks/s | acks per gateway CPU-s | Redis CPU µs / entry | acks per gateway CPU-s, × socket.io | Redis CPU per entry, × socket.io |")
print("|---|---|---|---|---|---|")
for t, name in names.items():
    print(f"| {name} | {med(t, 'acks_s'):,.0f} | {med(t, 'per_cpu_s'):,.0f} | {med(t, 'redis_us'):.2f} | "
          f"{ratio(med(t, 'per_cpu_s'), med('socketio', 'per_cpu_s'))} | {ratio(med(t, 'redis_us'), med('socketio', 'redis_us'))} |")
PY
