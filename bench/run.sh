#!/usr/bin/env bash
# The benchmark: the same scenarios against wsbridge, socket.io 4.8 + @socket.io/redis-adapter,
# and nchan, in one run on this machine, with examples/loadgen as the client fleet; and against
# the floor (examples/floor.rs: raw writes of the same frames to the same sockets, no gateway),
# so that every target's CPU per delivery is also reported as a multiple of the floor's.
#
#   bench/run.sh [--quick] [--targets floor,wsbridge,socketio,nchan] [--scenarios LIST] [--out DIR]
#
# --scenarios: a comma-separated subset of paced,burst,direct,user,inbound,idle10k,idle50k
# (default: all of them; --quick leaves out idle50k). Scenarios a target does not run are skipped.
# Binaries: built here with cargo (target/release), unless given as WSBRIDGE_BIN (the gateway),
# LOADGEN_BIN (examples/loadgen) and FLOOR_BIN (examples/floor) in the environment; what is
# given is not built.
# WSBRIDGE_CONFIG overrides the gateway's config file (default config/wsbridge.toml).
# bench/compare.sh runs this script for a before/after comparison of two sets of binaries.
#
# Every target runs as replicas sharing one fresh redis-server. Gateways and Redis are pinned
# to CPU 0, the load generator to CPU 1 (taskset). The floor is one process (there is no
# backplane to cross) holding all the connections, pinned to CPU 0 too; it runs paced and burst.
# Scenarios (loadgen --scenario):
#   paced     1,000 clients (500 per replica), one channel, 20 msgs/s published through the
#             second replica for 20 s: 20k deliveries/s. CPU per delivery, latency.
#   burst     1,000 messages x 1,000 clients, as fast as the publisher goes (100 per call where
#             the target takes batches), default settings: every message must arrive.
#   direct    20 rounds of one message to each of the 1,000 connections (wsbridge, socket.io).
#   user      the same, addressed to users (wsbridge).
#   inbound   1,000 clients x 100 sends into a stream (wsbridge), against redis-benchmark's
#             pipelined XADD on the same Redis.
#   idle10k   10,000 idle connections on 2 fresh replicas: RSS per connection.
#   idle50k   50,000 on 3 fresh replicas, 3 load generator processes (this machine's hard
#             open-files limit is 20,000 per process).
# Results: DIR/*.json (one loadgen report each), DIR/results.md (the tables, with ratios).
# Needs: the Rust toolchain; installs redis-server, nodejs/npm, nginx + libnginx-mod-nchan
# with apt-get when missing (root), and socket.io from npm into DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
TARGETS=floor,wsbridge,socketio,nchan
SCENARIOS=paced,burst,direct,user,inbound,idle10k,idle50k
OUT=target/bench/$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --targets) TARGETS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/run.log"
say() { echo "==> $*" | tee -a "$LOG" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v redis-server >/dev/null || need+=(redis-server)
[[ ",$TARGETS," == *",socketio,"* ]] && ! command -v npm >/dev/null && need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

for s in ${SCENARIOS//,/ }; do
  case "$s" in
    paced|burst|direct|user|inbound|idle10k|idle50k) ;;
    *) echo "bench/run.sh: unknown scenario $s" >&2; exit 2 ;;
  esac
done
want() { [[ ",$SCENARIOS," == *",$1,"* ]]; }

build=()
[ -z "${WSBRIDGE_BIN:-}" ] && build+=(--bin wsbridge)
[ -z "${LOADGEN_BIN:-}" ] && build+=(--example loadgen)
[[ ",$TARGETS," == *",floor,"* ]] && [ -z "${FLOOR_BIN:-}" ] && build+=(--example floor)
if [ ${#build[@]} -gt 0 ]; then
  say "building release binaries"
  cargo build --release "${build[@]}" 2>>"$LOG"
fi
LOADGEN=${LOADGEN_BIN:-$ROOT/target/release/examples/loadgen}
GW=${WSBRIDGE_BIN:-$ROOT/target/release/wsbridge}
FLOOR=${FLOOR_BIN:-$ROOT/target/release/examples/floor}
GW_CONFIG=${WSBRIDGE_CONFIG:-config/wsbridge.toml}
say "gateway $GW ($GW_CONFIG), load generator $LOADGEN"
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)

if [ "$QUICK" = 1 ]; then
  PACED_MESSAGES=100 BURST_MESSAGES=200 ROUNDS=5 SENDS=20 IDLE_BIG=0
else
  PACED_MESSAGES=400 BURST_MESSAGES=1000 ROUNDS=20 SENDS=100 IDLE_BIG=1
fi
SECRET=bench-secret

PIDS_TO_KILL=()
cleanup() {
  for p in "${PIDS_TO_KILL[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for d in "$OUT"/nchan-*; do [ -d "$d" ] && bench/peers/nchan/run.sh stop "$d" >/dev/null 2>&1 || true; done
  PIDS_TO_KILL=()
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for DESCRIPTION COMMAND...
  local what=$1; shift
  for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench/run.sh: timed out waiting for $what" >&2; exit 1
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

# Starts N replicas of $1; sets WS (comma-separated client URLs), APIS (publish URLs), PIDS.
WS= APIS= PIDS=
start_target() {
  local target=$1 n=$2 i ws=() apis=() pids=()
  for i in $(seq 1 "$n"); do
    local p q
    p=$(free_port); q=$(free_port)
    case "$target" in
      wsbridge)
        WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
        WSBRIDGE__REDIS__URL=redis://127.0.0.1:$REDIS_PORT WSBRIDGE__AUTH__JWT_SECRET=$SECRET \
        WSBRIDGE__LIMITS__MAX_CONNECTIONS=100000 RUST_LOG=warn \
          taskset -c 0 "$GW" --config "$GW_CONFIG" >>"$OUT/wsbridge-$i.log" 2>&1 &
        pids+=($!)
        wait_for "wsbridge replica $i" curl -sf "http://127.0.0.1:$q/readyz"
        ws+=("ws://127.0.0.1:$p/ws"); apis+=("http://127.0.0.1:$q") ;;
      socketio)
        taskset -c 0 node "$OUT/socketio/server.mjs" --port "$p" --api-port "$q" \
          --redis "redis://127.0.0.1:$REDIS_PORT" >>"$OUT/socketio-$i.log" 2>&1 &
        pids+=($!)
        wait_for "socket.io instance $i" curl -sf "http://127.0.0.1:$q/healthz"
        ws+=("ws://127.0.0.1:$p"); apis+=("http://127.0.0.1:$q") ;;
      nchan)
        local dir="$OUT/nchan-$i" line master worker
        rm -rf "$dir"; mkdir -p "$dir"
        line=$(NCHAN_WORKER_CONNECTIONS=$((NOFILE - 64)) bench/peers/nchan/run.sh start "$dir" "$p" "redis://127.0.0.1:$REDIS_PORT" | tail -1)
        master=$(sed -n 's/.*master=\([0-9]*\).*/\1/p' <<<"$line")
        worker=$(sed -n 's/.*worker=\([0-9]*\).*/\1/p' <<<"$line")
        taskset -a -p -c 0 "$master" >/dev/null; taskset -a -p -c 0 "$worker" >/dev/null
        pids+=("$worker")
        ws+=("ws://127.0.0.1:$p"); apis+=("http://127.0.0.1:$p") ;;
      floor)
        # One process, whatever N: it holds every connection and does every write.
        [ "$i" -gt 1 ] && continue
        taskset -c 0 "$FLOOR" --listen "127.0.0.1:$p" --api-listen "127.0.0.1:$q" >>"$OUT/floor.log" 2>&1 &
        pids+=($!)
        wait_for "floor" curl -sf "http://127.0.0.1:$q/healthz"
        ws+=("ws://127.0.0.1:$p"); apis+=("http://127.0.0.1:$q") ;;
    esac
  done
  PIDS_TO_KILL+=("${pids[@]}")
  for p in "${pids[@]}"; do disown "$p" 2>/dev/null || true; done
  WS=$(IFS=,; echo "${ws[*]}"); APIS=$(IFS=,; echo "${apis[*]}"); PIDS=$(IFS=,; echo "${pids[*]}")
}

stop_all() {
  cleanup
  sleep 0.5
}

# loadgen NAME TARGET ARGS...: one run, pinned to CPU 1; its JSON goes to $OUT/NAME.json.
loadgen() {
  local name=$1 target=$2; shift 2
  local auth=()
  [ "$target" = wsbridge ] && auth=(--jwt-secret "$SECRET")
  say "$name: $*"
  taskset -c 1 "$LOADGEN" --target "$target" --ws "$WS" --api "${APIS##*,}" --pids "$PIDS" \
    --redis-pid "$REDIS_PID" "${auth[@]}" --json "$OUT/$name.json" --quiet "$@" \
    >>"$LOG" 2>&1 || say "$name: loadgen exited $? (see run.log)"
}

for target in ${TARGETS//,/ }; do
  case "$target" in
    socketio) say "installing socket.io into $OUT/socketio"; bench/peers/socketio/install.sh "$OUT/socketio" >>"$LOG" ;;
    nchan) bench/peers/nchan/run.sh install >>"$LOG" ;;
  esac

  # The scenarios this target runs, of those asked for.
  run=()
  for s in paced burst direct user inbound; do
    case "$target:$s" in nchan:direct|socketio:user|nchan:user|socketio:inbound|nchan:inbound|floor:direct|floor:user|floor:inbound) continue ;; esac
    want "$s" && run+=("$s")
  done
  if [ ${#run[@]} -gt 0 ]; then
    start_redis; start_target "$target" 2
    for s in "${run[@]}"; do
      case "$s" in
        paced) loadgen "$target-paced" "$target" --scenario fanout --clients 1000 --messages "$PACED_MESSAGES" --rate 20 ;;
        burst) loadgen "$target-burst" "$target" --scenario fanout --clients 1000 --messages "$BURST_MESSAGES" --batch 100 ;;
        direct) loadgen "$target-direct" "$target" --scenario direct --clients 1000 --messages "$ROUNDS" --batch 100 ;;
        user) loadgen "$target-user" "$target" --scenario user --clients 1000 --messages "$ROUNDS" --batch 100 ;;
        inbound)
          loadgen "$target-inbound" "$target" --scenario inbound --clients 1000 --messages "$SENDS" --window 16
          say "redis-benchmark: pipelined XADD on the same Redis"
          taskset -c 1 redis-benchmark -p "$REDIS_PORT" -n 200000 -P 16 -c 50 -q --csv \
            XADD bench:xadd '*' data seq-1-t-1-pad-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx \
            >"$OUT/redis-benchmark-xadd.csv" 2>>"$LOG" ;;
      esac
    done
    stop_all
  fi

  # Idle connections, on fresh processes each time (not the floor's: it keeps nothing per
  # connection worth comparing).
  [ "$target" = floor ] && continue
  if want idle10k; then
    start_redis; start_target "$target" 2
    loadgen "$target-idle10k" "$target" --scenario idle --clients 10000 --settle-ms 3000
    stop_all
  fi
  if [ "$IDLE_BIG" = 1 ] && want idle50k; then
    start_redis; start_target "$target" 3
    IFS=, read -r -a ws_all <<<"$WS"; IFS=, read -r -a pid_all <<<"$PIDS"; IFS=, read -r -a api_all <<<"$APIS"
    say "$target-idle50k: 3 load generators x 16,667 connections, one replica each"
    lg=()
    for i in 0 1 2; do
      auth=(); [ "$target" = wsbridge ] && auth=(--jwt-secret "$SECRET")
      taskset -c 1 "$LOADGEN" --target "$target" --scenario idle --clients 16667 --settle-ms 5000 \
        --ws "${ws_all[$i]}" --api "${api_all[$i]}" --pids "${pid_all[$i]}" "${auth[@]}" \
        --first-source $((1 + 20 * i)) --connect-concurrency 128 \
        --json "$OUT/$target-idle50k-$i.json" --quiet >>"$LOG" 2>&1 &
      lg+=($!)
    done
    for p in "${lg[@]}"; do wait "$p" || say "$target-idle50k: a load generator exited $?"; done
    stop_all
  fi
done

say "machine"
{
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "redis: $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "rustc: $(rustc --version)"
  command -v node >/dev/null && echo "node: $(node --version)"
  command -v nginx >/dev/null && echo "nginx: $(nginx -v 2>&1 | sed 's/.*\///')"
} >"$OUT/machine.txt"
python3 bench/report.py "$OUT" | tee "$OUT/results.md"
say "results: $OUT/results.md"
