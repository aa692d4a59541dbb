#!/usr/bin/env bash
# The growth table (issue 20 item 2): what a delivery costs as one channel's audience grows.
#
#   bench/growth.sh [--quick] [--parts one,six] [--out DIR]
#
#   one  One replica (fresh, with a fresh Redis, for every size) and 1,000, 5,000, 10,000 and
#        19,000 subscribers of one channel (--quick: 500, 2,000). Every size gets the same
#        20,000 deliveries/s (20 msgs/s to 1,000 subscribers, ~1.05 msgs/s to 19,000) for 20 s
#        (--quick: 3 s): loadgen --scenario fanout --rate 20000/N.
#   floor  The same sizes and rate against the floor (examples/floor.rs: wsbridge's frames
#        written raw to the same sockets, one thread): how much of the growth is the kernel's
#        own (more sockets, fewer cache hits), so that wsbridge's cost is also given as × the
#        floor at each size.
#   six  100,002 connections over six replicas (16,667 each; --quick: 6 × 500), one channel,
#        six load generators (one per replica, source addresses 127.0.0.1+10i onwards): load
#        generator 0 publishes 0.2 msgs/s (20,000 deliveries/s again) for 8 messages
#        (--quick: 2 msgs/s, 4 messages), the others only count (--receive-only).
#
# Pinning as in bench/run.sh: gateways and Redis on CPU 0, load generators on CPU 1. Each run
# waits until every client has joined and seen a warm-up message (loadgen --ready-file), then
# until the replicas are idle, reads their RSS (connections joined, at rest), and starts the
# measured part (--go-file). 19,000 because a process may open 20,000 files here (wsbridge
# accepts at most that limit − 128); 16,667 per load generator for the same reason.
# Release binaries are built here (nice) unless WSBRIDGE_BIN and LOADGEN_BIN are given.
# Results: DIR/*.json (loadgen reports), DIR/*.rss (replica RSS KiB: at start, joined),
# DIR/*.load (load average before and after), DIR/results.md (bench/growth_report.py).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
PARTS=one,floor,six
OUT=target/bench/growth-$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --parts) PARTS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "bench/growth.sh: unknown argument $1 (expected --quick, --parts one,floor,six, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
for p in ${PARTS//,/ }; do
  case "$p" in one|floor|six) ;; *) echo "bench/growth.sh: unknown part $p (expected one, floor, six)" >&2; exit 2 ;; esac
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/run.log"
say() { echo "==> $*" | tee -a "$LOG" >&2; }

if ! command -v redis-server >/dev/null; then
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
[ -z "${WSBRIDGE_BIN:-}${LOADGEN_BIN:-}" ] && say "building release binaries"
# shellcheck source=bench/lib.sh
source bench/lib.sh
say "gateway $GW, load generator $LOADGEN"
ulimit -n "$(ulimit -Hn)"

DPS=20000 # deliveries/s, every size
CHANNEL=growth
if [ "$QUICK" = 1 ]; then
  SIZES="500 2000" SECONDS_PER_SIZE=3 SIX_CLIENTS=500 SIX_RATE=2 SIX_MESSAGES=4
else
  SIZES="1000 5000 10000 19000" SECONDS_PER_SIZE=20 SIX_CLIENTS=16667 SIX_RATE=0.2 SIX_MESSAGES=8
fi

# Load generators still running when the script stops are stopped too.
LGS=()
trap 'for p in "${LGS[@]}"; do kill "$p" 2>/dev/null || true; done; cleanup' EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Stops everything started so far (gateways, Redis), and waits for it to be gone.
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# start_replicas N: N fresh gateways on CPU 0 against the Redis on $REDIS_PORT; sets the arrays
# WS, API and GWPIDS.
start_replicas() {
  WS=() API=() GWPIDS=()
  local i p q
  for i in $(seq 1 "$1"); do
    p=$(free_port); q=$(free_port)
    WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
    WSBRIDGE__REDIS__URL=redis://127.0.0.1:$REDIS_PORT WSBRIDGE__SERVER__REPLICA_ID=g$i \
    WSBRIDGE__LIMITS__MAX_CONNECTIONS=19872 RUST_LOG=warn \
      taskset -c 0 "$GW" --config config/wsbridge.toml >>"$OUT/wsbridge-$i.log" 2>&1 &
    PIDS+=($!); GWPIDS+=($!)
    wait_for curl -sf "http://127.0.0.1:$q/readyz"
    WS+=("ws://127.0.0.1:$p/ws"); API+=("http://127.0.0.1:$q")
  done
}

# wait_ready FILE PID...: until FILE exists; fails when a load generator exits first.
wait_ready() {
  local file=$1 p; shift
  until [ -e "$file" ]; do
    for p in "$@"; do
      kill -0 "$p" 2>/dev/null || { say "a load generator exited before $file (see run.log)"; exit 1; }
    done
    sleep 0.2
  done
}

# wait_quiet PID...: until the processes together used under 20 ms of CPU in half a second
# (the warm-up's last deliveries done), 60 s at most.
wait_quiet() {
  local a b p
  for _ in $(seq 1 120); do
    a=0; for p in "$@"; do a=$(awk -v s="$a" -v c="$(cpu_s "$p")" 'BEGIN {print s + c}'); done
    sleep 0.5
    b=0; for p in "$@"; do b=$(awk -v s="$b" -v c="$(cpu_s "$p")" 'BEGIN {print s + c}'); done
    awk -v a="$a" -v b="$b" 'BEGIN {exit !(b - a < 0.02)}' && return 0
  done
  say "the replicas did not become idle within 60 s; measuring anyway"
}

# loadgen NAME INDEX ARGS...: one load generator on CPU 1 against replica INDEX, in the
# background (its pid in LGPID); the report goes to $OUT/NAME.json.
loadgen() {
  local name=$1 i=$2; shift 2
  echo "$name: loadgen --ws ${WS[$i]} --api ${API[$i]} --pids ${GWPIDS[$i]} $*" >>"$LOG"
  taskset -c 1 "$LOADGEN" --target wsbridge --scenario fanout --channel "$CHANNEL" \
    --ws "${WS[$i]}" --api "${API[$i]}" --pids "${GWPIDS[$i]}" --connect-concurrency 128 \
    --timeout-s 300 --json "$OUT/$name.json" --quiet "$@" >>"$LOG" 2>&1 &
  LGPID=$!
  LGS+=("$LGPID")
}

if want one; then
  for n in $SIZES; do
    name=one-$n
    rate=$(awk -v d="$DPS" -v n="$n" 'BEGIN {printf "%.4f", d / n}')
    messages=$(awk -v r="$rate" -v s="$SECONDS_PER_SIZE" 'BEGIN {m = int(r * s + 0.5); print (m < 2 ? 2 : m)}')
    say "$name: $n subscribers on one replica, $messages messages at $rate msgs/s"
    REDIS_PORT=$(free_port); redis_on_cpu0 "$REDIS_PORT"
    start_replicas 1
    rss0=$(rss_kib "${GWPIDS[0]}")
    echo "$(loadavg)" >"$OUT/$name.load"
    loadgen "$name" 0 --clients "$n" --messages "$messages" --rate "$rate" --redis-pid "$REDIS_PID" \
      --ready-file "$OUT/$name.ready" --go-file "$OUT/$name.go"
    wait_ready "$OUT/$name.ready" "$LGPID"
    wait_quiet "${GWPIDS[0]}"
    echo "${GWPIDS[0]} $rss0 $(rss_kib "${GWPIDS[0]}")" >"$OUT/$name.rss"
    touch "$OUT/$name.go"
    wait "$LGPID" || say "$name: loadgen exited $? (see run.log)"
    LGS=()
    echo "$(loadavg)" >>"$OUT/$name.load"
    stop_all
  done
fi

if want floor; then
  FLOOR=${FLOOR_BIN:-$ROOT/target/release/examples/floor}
  [ -x "$FLOOR" ] || cargo build --release --example floor 2>>"$OUT/build.log"
  for n in $SIZES; do
    name=floor-$n
    rate=$(awk -v d="$DPS" -v n="$n" 'BEGIN {printf "%.4f", d / n}')
    messages=$(awk -v r="$rate" -v s="$SECONDS_PER_SIZE" 'BEGIN {m = int(r * s + 0.5); print (m < 2 ? 2 : m)}')
    say "$name: $n subscribers of the floor, $messages messages at $rate msgs/s"
    p=$(free_port); q=$(free_port)
    taskset -c 0 "$FLOOR" --listen "127.0.0.1:$p" --api-listen "127.0.0.1:$q" >>"$OUT/floor.log" 2>&1 &
    fpid=$!
    PIDS+=("$fpid")
    wait_for curl -sf "http://127.0.0.1:$q/healthz"
    echo "$(loadavg)" >"$OUT/$name.load"
    echo "$name: loadgen --target floor --clients $n --messages $messages --rate $rate" >>"$LOG"
    taskset -c 1 "$LOADGEN" --target floor --scenario fanout --channel "$CHANNEL" \
      --ws "ws://127.0.0.1:$p/ws" --api "http://127.0.0.1:$q" --pids "$fpid" --connect-concurrency 128 \
      --timeout-s 300 --json "$OUT/$name.json" --quiet --clients "$n" --messages "$messages" \
      --rate "$rate" >>"$LOG" 2>&1 || say "$name: loadgen exited $? (see run.log)"
    echo "$(loadavg)" >>"$OUT/$name.load"
    stop_all
  done
fi

if want six; then
  name=six
  total=$((6 * SIX_CLIENTS))
  avail=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo)
  # Six load generators of 16,667 clients take ~9 GiB (bench/presence.sh --parts bigreal).
  if [ "$QUICK" = 0 ] && [ "$avail" -lt 12 ]; then
    say "six: skipped, $avail GiB of memory available (needs ~12)"
  else
    say "six: $total connections over 6 replicas, $SIX_MESSAGES messages at $SIX_RATE msgs/s"
    REDIS_PORT=$(free_port); redis_on_cpu0 "$REDIS_PORT"
    start_replicas 6
    : >"$OUT/$name.rss"
    rss0=(); for p in "${GWPIDS[@]}"; do rss0+=("$(rss_kib "$p")"); done
    echo "$(loadavg)" >"$OUT/$name.load"
    lgs=()
    for i in 0 1 2 3 4 5; do
      role=(--receive-only)
      [ "$i" = 0 ] && role=(--redis-pid "$REDIS_PID")
      loadgen "$name-$i" "$i" --clients "$SIX_CLIENTS" --messages "$SIX_MESSAGES" --rate "$SIX_RATE" \
        --first-source $((1 + 10 * i)) --ready-file "$OUT/$name-$i.ready" --go-file "$OUT/$name.go" \
        "${role[@]}"
      lgs+=("$LGPID")
    done
    for i in 0 1 2 3 4 5; do wait_ready "$OUT/$name-$i.ready" "${lgs[@]}"; done
    wait_quiet "${GWPIDS[@]}"
    for i in 0 1 2 3 4 5; do
      echo "${GWPIDS[$i]} ${rss0[$i]} $(rss_kib "${GWPIDS[$i]}")" >>"$OUT/$name.rss"
    done
    touch "$OUT/$name.go"
    for p in "${lgs[@]}"; do wait "$p" || say "six: a load generator exited $? (see run.log)"; done
    LGS=()
    echo "$(loadavg)" >>"$OUT/$name.load"
    stop_all
  fi
fi

{
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "redis: $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "gateway source: $(git log -1 --format=%h -- src Cargo.toml Cargo.lock 2>/dev/null || echo unknown)"
} >"$OUT/machine.txt"
python3 bench/growth_report.py "$OUT" | tee "$OUT/results.md"
say "results: $OUT/results.md"
