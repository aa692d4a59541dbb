#!/usr/bin/env bash
# Soak (issue 20 item 4): mixed load on two gateway replicas for DURATION seconds (default 900),
# with one Redis restart (SIGKILL, then again from its append-only file) half way, sampling
# every 10 s each replica's RSS, open file descriptors, connections, delivery latency (p50/p99
# of the interval, from the gateway's histogram) and drop counters. The loads stop three times,
# after a 4-minute warm-up, at 2/3 of the run and at the end, for a sample of the replicas at
# rest (no connection): RSS and the heap in use at rest, compared, are the growth after warm-up;
# the busy samples swing with what is in flight (a connection storm's buffers, sends queued
# during the Redis restart). DURATION counts loaded time only; the rests add about a minute.
#
#   bench/soak.sh [--duration S] [--out DIR]
#
# Load, each in a loop of load generator runs until the end (a run that fails because Redis
# was restarting under it is logged and the next one starts):
#   fan-out  400 clients on both replicas, one channel, 20 msgs/s
#   1:1      200 clients, one message to each every 2 s (direct, 100 calls/s)
#   inbound  10 clients sending into a stream, one in flight each
#   churn    200 clients connecting, joining a presence channel, leaving, again
# Redis and the replicas on CPU 0, the load generators on CPU 1 (taskset), as bench/run.sh.
# Results: DIR/samples.csv, DIR/soak.md (growth after warm-up), DIR/soak.png (bench/report.py
# --soak DIR, matplotlib from a venv under target/).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=900
OUT=target/bench/soak-$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
. bench/lib.sh
SECRET=soak-secret

REDIS_PORT=$(free_port)
start_redis() { redis_on_cpu0 "$REDIS_PORT" --appendonly yes --appendfsync everysec; }
start_redis

cat >"$OUT/soak.toml" <<EOF
[[channels]]
pattern = "lobby"
presence = true
EOF
WS=(); API=(); GWPIDS=()
for i in 0 1; do
  p=$(free_port); q=$(free_port)
  WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
  WSBRIDGE__REDIS__URL=redis://127.0.0.1:$REDIS_PORT WSBRIDGE__AUTH__JWT_SECRET=$SECRET \
  WSBRIDGE__INBOUND__STREAMS=chat WSBRIDGE__LIMITS__CLIENT_MESSAGES_PER_SECOND=100000 \
  WSBRIDGE__LIMITS__CLIENT_BURST_MESSAGES=100000 RUST_LOG=warn \
    taskset -c 0 "$GW" --config "$OUT/soak.toml" >>"$OUT/wsbridge-$i.log" 2>&1 &
  GWPIDS+=($!); PIDS+=($!)
  WS+=("ws://127.0.0.1:$p/ws"); API+=("http://127.0.0.1:$q")
  wait_for curl -sf "http://127.0.0.1:$q/readyz"
done
BOTH="${WS[0]},${WS[1]}"
# One load in a loop until END; each run's report and exit status go to DIR/<name>.log.
loop() {
  local name=$1; shift
  local n=0
  while [ "$(date +%s)" -lt "$END" ]; do
    n=$((n + 1))
    if taskset -c 1 "$LOADGEN" --target wsbridge --jwt-secret "$SECRET" --quiet "$@" \
        >>"$OUT/$name.log" 2>&1; then
      echo "run $n ok" >>"$OUT/$name.log"
    else
      echo "run $n failed (exit $?)" >>"$OUT/$name.log"
      sleep 1
    fi
  done
}

# Samples: time, replica, RSS KiB, open fds, connections, deliveries, dropped (all reasons),
# the allocator's heap in use and held (wsbridge_heap_*: a leak grows the first, memory the
# allocator keeps after a burst only the second), and the delivery latency histogram's
# cumulative buckets (for the interval's percentiles).
sample() {
  local t=$1 rest=${2:-}
  for i in 0 1; do
    local pid=${GWPIDS[$i]}
    local rss fds
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
    fds=$(ls "/proc/$pid/fd" | wc -l)
    curl -sf "${API[$i]}/metrics" >"$OUT/metrics-$i.txt" || : >"$OUT/metrics-$i.txt"
    python3 - "$t" "$i" "$rss" "$fds" "$OUT/metrics-$i.txt" "$rest" >>"$OUT/samples.jsonl" <<'PY' || true
import json, sys
t, replica, rss, fds, path, rest = sys.argv[1:7]
conns = deliveries = dropped = 0.0
heap_in_use = heap_held = None
buckets = {}
for line in open(path):
    if line.startswith('#') or not line.strip():
        continue
    name, value = line.rsplit(' ', 1)
    value = float(value)
    if name == 'wsbridge_connections':
        conns = value
    elif name == 'wsbridge_heap_in_use_bytes':
        heap_in_use = value
    elif name == 'wsbridge_heap_held_bytes':
        heap_held = value
    elif name == 'wsbridge_deliveries_total':
        deliveries = value
    elif name.startswith('wsbridge_delivery_dropped_total'):
        dropped += value
    elif name.startswith('wsbridge_delivery_latency_seconds_bucket{'):
        buckets[name.split('le="')[1].split('"')[0]] = value
print(json.dumps({"t": int(t), "replica": int(replica), "rss_kib": int(rss), "fds": int(fds),
                  "connections": conns, "deliveries": deliveries, "dropped": dropped,
                  "heap_in_use": heap_in_use, "heap_held": heap_held, "rest": rest or None,
                  "latency_buckets": buckets}))
PY
  done
}
# All four loads until END, sampling every 10 s (Redis is restarted once, at DURATION / 2).
run_load() {
  loop fanout --scenario fanout --ws "$BOTH" --api "${API[1]}" --clients 400 --channel soak \
    --messages 600 --rate 20 --timeout-s 60 &
  LOOPS=($!)
  loop direct --scenario direct --ws "$BOTH" --api "${API[0]}" --clients 200 --messages 15 \
    --rate 100 --timeout-s 60 &
  LOOPS+=($!)
  loop inbound --scenario inbound --ws "$BOTH" --clients 10 --messages 2000 --window 1 \
    --stream chat --timeout-s 60 &
  LOOPS+=($!)
  loop churn --scenario churn --ws "$BOTH" --api "${API[0]}" --clients 200 --channel lobby &
  LOOPS+=($!)
  while [ "$(date +%s)" -lt "$END" ]; do
    now=$(( $(date +%s) - T0 ))
    sample "$now"
    if [ "$RESTARTED" -eq 0 ] && [ "$now" -ge $(( DURATION / 2 )) ]; then
      echo "$now redis restart" >>"$OUT/events.log"
      kill -9 "$REDIS_PID"
      sleep 2
      start_redis
      RESTARTED=1
    fi
    sleep 10
  done
  for p in "${LOOPS[@]}"; do wait "$p" || true; done
}

# The replicas at rest: every load stopped, every connection gone, then 15 s (more than one
# server.heap_trim_interval_seconds) for memory a burst freed to be given back; one sample
# marked REST. Busy samples swing with what is in flight; these compare like with like.
rest_sample() {
  for i in 0 1; do
    wait_for sh -c "curl -sf '${API[$i]}/metrics' | grep -qx 'wsbridge_connections 0'"
  done
  sleep 15
  sample $(( $(date +%s) - T0 )) "$1"
}

# Warm-up (the first 4 minutes), at rest; load until 2/3 of the run (the Redis restart is in
# it), at rest; load to the end, at rest. Three rests tell a step (warm-up to middle, then
# flat) from a slope (growing at each).
T0=$(date +%s)
RESTARTED=0
LOADED=0
for phase in warm:240 mid:$(( DURATION * 2 / 3 )) end:$DURATION; do
  label=${phase%%:*}; until=${phase##*:}
  [ "$until" -gt "$LOADED" ] || continue
  END=$(( $(date +%s) + until - LOADED ))
  LOADED=$until
  run_load
  rest_sample "$label"
  echo "$(( $(date +%s) - T0 )) at rest ($label)" >>"$OUT/events.log"
done
for name in fanout direct inbound churn; do
  echo "$name: $(grep -c ' ok$' "$OUT/$name.log") runs ok, $(grep -c 'failed' "$OUT/$name.log") failed"
done | tee "$OUT/runs.txt"

python3 bench/report.py --soak "$OUT" || true
VENV="$ROOT/target/bench-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'matplotlib==3.9.2' 2>>"$OUT/build.log" \
  && "$VENV/bin/python" bench/report.py --soak "$OUT" --png || echo "no plot: matplotlib did not install"
cat "$OUT/soak.md"
