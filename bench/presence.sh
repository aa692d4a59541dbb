#!/usr/bin/env bash
# Presence (issue 16), measured: what a join costs, a connection storm into one presence
# channel, a channel of 100,000 members, and a killed replica's members leaving.
#
#   bench/presence.sh [--quick] [--parts cost,storm,big,kill,bigreal] [--out DIR]
#
# Release binaries are built here (nice -n 19) unless WSBRIDGE_BIN / LOADGEN_BIN are given.
# STORM_CHANNELS (default "p:storm q:storm plain:storm") picks the storm variants.
# Redis and the gateways are pinned to CPU 0, the load generator to CPU 1, as in bench/run.sh;
# every part starts on a fresh Redis and fresh replicas with bench/presence.toml (`p:*` presence
# with join/leave frames, `q:*` presence without them, everything else no presence).
#   cost   `loadgen --scenario churn`: N clients connect, subscribe, disconnect; on a `p:`, a `q:`
#          and a plain channel, alternating, twice each. Gateway CPU per join from /proc, Redis
#          commands per join from INFO commandstats (CONFIG RESETSTAT before each run).
#   storm  `loadgen --scenario storm`: 2 watchers, then 10,000 clients (--quick: 2,000) into one
#          channel on 2 replicas; with 100 probe subscribers of a plain channel getting 50 msgs/s
#          during the storm. Variants: p: (join/leave), q: (presence only), plain (no
#          presence), and no storm at all (probe only, as long as the p: storm took).
#   big    the read path of a 100,000-member channel: the members hash and users hash written
#          straight into Redis in the documented format (src/presence/mod.rs), then
#          `loadgen --scenario query` (POST /presence, limit 100 and the default) through a
#          replica; 100 and 10,000 members for comparison.
#   kill   `loadgen --scenario kill`: N members on replica 1, a watcher on replica 2, SIGKILL
#          replica 1; time until the watcher saw N leaves. N = 1,000 and 5,000 (--quick: 1,000),
#          default presence timing (10 s / 2000 ms) and a short one (2 s / 300 ms).
#   bigreal (only when asked for): 100,002 real connections in one `q:` channel, 6 replicas and
#          6 load generators of 16,667 (20,000 open files per process here), ~9 GB of memory
#          for the load generators; the count's convergence and the same queries as `big`.
# Results: DIR/*.json (loadgen reports), DIR/*.commandstats, DIR/run.log, DIR/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
PARTS=cost,storm,big,kill
OUT=target/bench/presence-$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --parts) PARTS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "bench/presence.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/run.log"
say() { echo "==> $*" | tee -a "$LOG" >&2; }

build=()
[ -z "${WSBRIDGE_BIN:-}" ] && build+=(--bin wsbridge)
[ -z "${LOADGEN_BIN:-}" ] && build+=(--example loadgen)
if [ ${#build[@]} -gt 0 ]; then
  say "building release binaries"
  nice -n 19 cargo build --release "${build[@]}" 2>>"$LOG"
fi
LOADGEN=${LOADGEN_BIN:-$ROOT/target/release/examples/loadgen}
GW=${WSBRIDGE_BIN:-$ROOT/target/release/wsbridge}
CONFIG=$ROOT/bench/presence.toml
ulimit -n "$(ulimit -Hn)"

if [ "$QUICK" = 1 ]; then
  CHURN=500 STORM=2000 KILLS="1000" BIG="100 10000"
else
  CHURN=2000 STORM=10000 KILLS="1000 5000" BIG="100 10000 100000"
fi

PIDS_TO_KILL=()
cleanup() {
  for p in "${PIDS_TO_KILL[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  PIDS_TO_KILL=()
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() {
  local what=$1; shift
  for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench/presence.sh: timed out waiting for $what" >&2; exit 1
}

REDIS_PORT= REDIS_PID=
start_redis() {
  REDIS_PORT=$(free_port)
  taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$OUT" --logfile "$OUT/redis.log" &
  REDIS_PID=$!
  disown "$REDIS_PID"
  PIDS_TO_KILL+=("$REDIS_PID")
  wait_for "redis on $REDIS_PORT" redis-cli -p "$REDIS_PORT" ping
}
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

# start_replicas N [ENV=VALUE...]: sets WS, APIS, PIDS (comma-separated) and API1 / API2.
WS= APIS= PIDS=
start_replicas() {
  local n=$1 i ws=() apis=() pids=(); shift
  for i in $(seq 1 "$n"); do
    local p q
    p=$(free_port); q=$(free_port)
    env "$@" WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
      WSBRIDGE__REDIS__URL=redis://127.0.0.1:$REDIS_PORT WSBRIDGE__SERVER__REPLICA_ID=r$i \
      RUST_LOG=warn,wsbridge::presence=info \
      taskset -c 0 "$GW" --config "$CONFIG" >>"$OUT/wsbridge-$i.log" 2>&1 &
    pids+=($!)
    wait_for "wsbridge replica $i" curl -sf "http://127.0.0.1:$q/readyz"
    ws+=("ws://127.0.0.1:$p/ws"); apis+=("http://127.0.0.1:$q")
  done
  PIDS_TO_KILL+=("${pids[@]}")
  for p in "${pids[@]}"; do disown "$p" 2>/dev/null || true; done
  WS=$(IFS=,; echo "${ws[*]}"); APIS=$(IFS=,; echo "${apis[*]}"); PIDS=$(IFS=,; echo "${pids[*]}")
  API1=${apis[0]}; API2=${apis[1]:-${apis[0]}}
}
fresh() { cleanup; sleep 0.5; start_redis; start_replicas "$@"; }

# loadgen NAME ARGS...: one run pinned to CPU 1; the report goes to $OUT/NAME.json.
loadgen() {
  local name=$1; shift
  say "$name: loadgen $*"
  taskset -c 1 "$LOADGEN" --target wsbridge --redis-pid "$REDIS_PID" --json "$OUT/$name.json" \
    --quiet "$@" >>"$LOG" 2>&1 || say "$name: loadgen exited $? (see run.log)"
}
# The presence counters of every live replica, summed, after a part (ghosts and drops must be
# 0), with the delivery drops, slow-consumer closes and handshake timeouts beside them.
metrics() {
  local name=$1 api
  for api in ${APIS//,/ }; do
    curl -s "$api/metrics" \
      | grep -E '^wsbridge_presence|^wsbridge_delivery_dropped_total|slow_consumer|handshake_timeout' || true
  done | awk '{s[$1]+=$2} END {for (k in s) print k, s[k]}' | sort >"$OUT/$name.metrics"
}

if want cost; then
  fresh 2
  for run in 1 2; do
    for ch in plain:cost-$run p:cost-$run q:cost-$run; do
      name=cost-${ch%%:*}-$run
      rcli CONFIG RESETSTAT >/dev/null
      loadgen "$name" --scenario churn --clients "$CHURN" --channel "$ch" --ws "$WS" \
        --api "$API1" --pids "$PIDS" --settle-ms 1000
      rcli INFO commandstats >"$OUT/$name.commandstats"
    done
  done
  metrics cost
fi

if want storm; then
  probe=(--probe-rate 50 --probe-clients 100)
  for ch in ${STORM_CHANNELS:-p:storm q:storm plain:storm}; do
    name=storm-${ch%%:*}
    fresh 2
    loadgen "$name" --scenario storm --clients "$STORM" --watchers 2 --channel "$ch" \
      --ws "$WS" --api "$API1" --pids "$PIDS" "${probe[@]}" --timeout-s 300
    metrics "$name"
  done
  ms=$(python3 -c "import json; print(int(1000 * json.load(open('$OUT/storm-p.json'))['probe_window_s']))" 2>/dev/null || echo 10000)
  fresh 2
  loadgen storm-none --scenario storm --clients 0 --watchers 0 --channel plain:none \
    --ws "$WS" --api "$API1" --pids "$PIDS" "${probe[@]}" --probe-ms "$ms"
fi

if want big; then
  fresh 1
  for n in $BIG; do
    say "big: writing $n members of p:big-$n into Redis"
    # The documented format: presence:{c} connection -> "<user key>\n<member JSON>", and
    # presence-users:{c} user key -> connections; anonymous members, each its own user.
    rcli EVAL "
      for i = 1, tonumber(ARGV[1]) do
        local c = 'rX.' .. string.format('%x', i) .. '.' .. i
        redis.call('HSET', KEYS[1], c, 'c:' .. c .. '\n' .. '{\"connection\":\"' .. c .. '\",\"user\":null,\"info\":null}')
        redis.call('HSET', KEYS[2], 'c:' .. c, 1)
      end
      return redis.call('HLEN', KEYS[1])" 2 "wsbridge:presence:{p:big-$n}" "wsbridge:presence-users:{p:big-$n}" "$n" >>"$LOG"
    rcli MEMORY USAGE "wsbridge:presence:{p:big-$n}" >"$OUT/big-$n.memory"
    rcli MEMORY USAGE "wsbridge:presence-users:{p:big-$n}" >>"$OUT/big-$n.memory"
    loadgen "big-$n-limit100" --scenario query --channel "p:big-$n" --limit 100 --messages 200 \
      --ws "$WS" --api "$API1"
    loadgen "big-$n-default" --scenario query --channel "p:big-$n" --messages 100 \
      --ws "$WS" --api "$API1"
  done
fi

# Not in the default parts (--parts bigreal): 100,002 real connections in one presence channel
# without join/leave (`q:`), 6 replicas and 6 load generators of 16,667 each (this machine's
# limit is 20,000 open files per process), then the same queries as `big`.
if want bigreal; then
  fresh 6
  IFS=, read -r -a ws_all <<<"$WS"; IFS=, read -r -a api_all <<<"$APIS"; IFS=, read -r -a pid_all <<<"$PIDS"
  say "bigreal: 6 load generators x 16,667 connections into q:big-real, one replica each"
  t0=$(date +%s.%N)
  lg=()
  for i in 0 1 2 3 4 5; do
    taskset -c 1 "$LOADGEN" --target wsbridge --scenario idle --clients 16667 --channel q:big-real \
      --settle-ms 60000 --ws "${ws_all[$i]}" --api "${api_all[$i]}" --pids "${pid_all[$i]}" \
      --first-source $((1 + 10 * i)) --connect-concurrency 128 --timeout-s 300 \
      --json "$OUT/bigreal-idle-$i.json" --quiet >>"$LOG" 2>&1 &
    lg+=($!)
  done
  count() { curl -s -XPOST "$API1/presence" -d '{"channel":"q:big-real","limit":1}' | python3 -c 'import json,sys; print(json.load(sys.stdin).get("connections", -1))' 2>/dev/null || echo -1; }
  n=0
  for _ in $(seq 1 3000); do n=$(count); [ "$n" = 100002 ] && break; sleep 0.1; done
  t1=$(date +%s.%N)
  echo "{\"members\": $n, \"seconds_from_start_until_counted\": $(python3 -c "print($t1 - $t0)")}" >"$OUT/bigreal-converge.json"
  say "bigreal: presence counted $n after $(python3 -c "print(round($t1 - $t0, 1))") s"
  loadgen bigreal-limit100 --scenario query --channel q:big-real --limit 100 --messages 200 --ws "$WS" --api "$API1"
  loadgen bigreal-default --scenario query --channel q:big-real --messages 100 --ws "$WS" --api "$API1"
  ps -o rss= -p "${pid_all[@]}" | awk '{s+=$1} END {print "replicas RSS KiB:", s}' >>"$OUT/bigreal-converge.json.txt"
  for p in "${lg[@]}"; do wait "$p" || say "bigreal: a load generator exited $?"; done
  t2=$(date +%s.%N)
  for _ in $(seq 1 3000); do n=$(count); [ "$n" = 0 ] && break; sleep 0.1; done
  t3=$(date +%s.%N)
  say "bigreal: after the load generators exited, presence counted $n after $(python3 -c "print(round($t3 - $t2, 1))") s"
  metrics bigreal
fi

if want kill; then
  for timing in default short; do
    envs=()
    [ "$timing" = short ] && envs=(WSBRIDGE__PRESENCE__REPLICA_TTL_SECONDS=2 WSBRIDGE__PRESENCE__HEARTBEAT_INTERVAL_MS=300)
    for n in $KILLS; do
      fresh 2 "${envs[@]}"
      victim=${PIDS%%,*}
      loadgen "kill-$timing-$n" --scenario kill --clients "$n" --watchers 1 --channel p:kill \
        --ws "$WS" --api "$API2" --pids "${PIDS#*,}" --kill-pid "$victim" --timeout-s 300
      metrics "kill-$timing-$n"
    done
  done
fi
cleanup

say "machine"
{
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "redis: $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"
python3 bench/presence_report.py "$OUT" | tee "$OUT/summary.txt"
