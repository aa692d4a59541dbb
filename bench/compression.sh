#!/usr/bin/env bash
# permessage-deflate and client publish, in one run: wsbridge with compression off and on,
# against socket.io 4.8 with perMessageDeflate on and off (bench/peers/socketio), with
# examples/loadgen's wire scenarios as the clients (loadgen/wire.rs: our own WebSocket client,
# which offers permessage-deflate, reads RSV1 frames and inflates them, and counts every byte
# read off its sockets).
#
#   bench/compression.sh [--quick] [--parts wire,idle,publish] [--out DIR]
#
# Parts, each on fresh processes (2 replicas on one fresh Redis, like bench/run.sh):
#   wire     1,000 subscribers (500 per replica) of one channel, MESSAGES (200; --quick 60)
#            realistic JSON messages of ~1 KiB (loadgen's `realistic`: a batch of trades, values
#            varying per message) at 20/s through POST /send: bytes read off the sockets per
#            delivery, frames compressed, gateway CPU per delivery (/proc/PID/stat, all threads:
#            ws compresses in libuv's thread pool), latency.
#   idle     IDLE_CLIENTS (5,000; --quick 2,000) subscribers offering permessage-deflate: RSS per
#            connection when idle, and after one ~1 KiB message to each (per-connection
#            compressor state shows there).
#   publish  (wsbridge) 1,000 subscribers, 10 publishing clients, MESSAGES messages at 20/s:
#            latency from a client's frame to the other clients' read, through a `send` to the
#            stream `chat` + the Rust example backend (examples/backends/rust) + POST /send, and
#            through a client `publish` frame when this build has it.
# Configurations: wsbridge-off (WSBRIDGE__SERVER__PERMESSAGE_DEFLATE=false), wsbridge-on (WSBRIDGE__SERVER__PERMESSAGE_DEFLATE
# = true, WSBRIDGE__SERVER__PERMESSAGE_DEFLATE_MIN_BYTES = 256; override with WSBRIDGE_DEFLATE_ENV
# as "K=V K=V"), socketio-off (perMessageDeflate false), socketio-on (--deflate-threshold 256).
# A wsbridge that does not start with the deflate keys (no such keys: deny_unknown_fields) or
# starts without negotiating gets its "on" rows marked "not in this build" and is not measured.
# The clients offer permessage-deflate in every configuration; "off" servers decline it.
# Gateways, Redis and the backend are pinned to CPU 0, the load generator to CPU 1.
#
# Binaries: target/release, built here unless WSBRIDGE_BIN / LOADGEN_BIN / BACKEND_BIN are set.
# WSBRIDGE_CONFIG overrides the gateway's config file (default config/wsbridge.toml).
# Results: DIR/*.json (one loadgen report each), DIR/results.md (bench/compression_report.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
PARTS=wire,idle,publish
OUT=target/bench/compression-$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --parts) PARTS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "bench/compression.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/run.log"
say() { echo "==> $*" | tee -a "$LOG" >&2; }

if [ "$QUICK" = 1 ]; then MESSAGES=60 IDLE_CLIENTS=2000; else MESSAGES=200 IDLE_CLIENTS=5000; fi
PAYLOAD=1024
THRESHOLD=256
SECRET=bench-secret
read -r -a DEFLATE_ENV <<<"${WSBRIDGE_DEFLATE_ENV:-WSBRIDGE__SERVER__PERMESSAGE_DEFLATE=true WSBRIDGE__SERVER__PERMESSAGE_DEFLATE_MIN_BYTES=$THRESHOLD}"

build=()
[ -z "${WSBRIDGE_BIN:-}" ] && build+=(--bin wsbridge)
[ -z "${LOADGEN_BIN:-}" ] && build+=(--example loadgen)
[ -z "${BACKEND_BIN:-}" ] && build+=(--example backend)
if [ ${#build[@]} -gt 0 ]; then
  say "building release binaries: ${build[*]}"
  cargo build --release "${build[@]}" 2>>"$LOG"
fi
GW=${WSBRIDGE_BIN:-$ROOT/target/release/wsbridge}
LOADGEN=${LOADGEN_BIN:-$ROOT/target/release/examples/loadgen}
BACKEND=${BACKEND_BIN:-$ROOT/target/release/examples/backend}
say "gateway $GW, load generator $LOADGEN, backend $BACKEND; output $OUT"
ulimit -n "$(ulimit -Hn)"
say "installing socket.io into $OUT/socketio"
bench/peers/socketio/install.sh "$OUT/socketio" >>"$LOG"

PIDS_TO_KILL=()
cleanup() {
  for p in "${PIDS_TO_KILL[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  PIDS_TO_KILL=()
}
trap cleanup EXIT
stop_all() { cleanup; sleep 0.5; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# ready PID URL: waits for URL to answer while PID lives; 1 if PID died or 20 s passed.
ready() {
  for _ in $(seq 1 200); do
    kill -0 "$1" 2>/dev/null || return 1
    curl -sf "$2" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

REDIS_PORT= REDIS_PID=
start_redis() {
  REDIS_PORT=$(free_port)
  taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$OUT" --logfile "$OUT/redis.log" &
  REDIS_PID=$!
  disown "$REDIS_PID"
  PIDS_TO_KILL+=("$REDIS_PID")
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench/compression.sh: redis did not start" >&2; exit 1
}

# start CONFIG: Redis + 2 replicas of CONFIG (wsbridge-off|wsbridge-on|socketio-off|socketio-on);
# sets WS, APIS, PIDS, TARGET. Returns 1 when a replica does not come up (wsbridge-on on a build
# without the feature).
WS= APIS= PIDS= TARGET=
# The default config with client publish opened on room:* (the publish part's channel).
if [ -z "${WSBRIDGE_CONFIG:-}" ]; then
  WSBRIDGE_CONFIG="$OUT/wsbridge.toml"
  sed 's/^# client_publish = false .*/client_publish = true/' config/wsbridge.toml >"$WSBRIDGE_CONFIG"
  grep -q '^client_publish = true' "$WSBRIDGE_CONFIG" || { echo "bench/compression.sh: could not open client publish in the config" >&2; exit 1; }
fi
start() {
  local config=$1 i ws=() apis=() pids=()
  start_redis
  for i in 1 2; do
    local p q pid
    p=$(free_port); q=$(free_port)
    case "$config" in
      wsbridge-*)
        TARGET=wsbridge
        local extra=()
        # The gateway accepts permessage-deflate by default: "off" turns it off explicitly.
        extra=(WSBRIDGE__SERVER__PERMESSAGE_DEFLATE=false)
        [ "$config" = wsbridge-on ] && extra=("${DEFLATE_ENV[@]}")
        env WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
          WSBRIDGE__REDIS__URL=redis://127.0.0.1:$REDIS_PORT WSBRIDGE__AUTH__JWT_SECRET=$SECRET \
          WSBRIDGE__LIMITS__MAX_CONNECTIONS=100000 RUST_LOG=warn "${extra[@]}" \
          taskset -c 0 "$GW" --config "${WSBRIDGE_CONFIG:-config/wsbridge.toml}" >>"$OUT/$config-$i.log" 2>&1 &
        pid=$!; disown "$pid"; PIDS_TO_KILL+=("$pid")
        ready "$pid" "http://127.0.0.1:$q/readyz" || { say "$config: replica $i did not start (see $config-$i.log)"; return 1; }
        ws+=("ws://127.0.0.1:$p/ws") ;;
      socketio-*)
        TARGET=socketio
        local extra=()
        [ "$config" = socketio-on ] && extra=(--deflate-threshold "$THRESHOLD")
        taskset -c 0 node "$OUT/socketio/server.mjs" --port "$p" --api-port "$q" \
          --redis "redis://127.0.0.1:$REDIS_PORT" "${extra[@]}" >>"$OUT/$config-$i.log" 2>&1 &
        pid=$!; disown "$pid"; PIDS_TO_KILL+=("$pid")
        ready "$pid" "http://127.0.0.1:$q/healthz" || { say "$config: instance $i did not start"; return 1; }
        ws+=("ws://127.0.0.1:$p") ;;
    esac
    pids+=("$pid"); apis+=("http://127.0.0.1:$q")
  done
  WS=$(IFS=,; echo "${ws[*]}"); APIS=$(IFS=,; echo "${apis[*]}"); PIDS=$(IFS=,; echo "${pids[*]}")
}

# loadgen NAME ARGS...: one run pinned to CPU 1, report in $OUT/NAME.json.
loadgen() {
  local name=$1; shift
  local auth=()
  [ "$TARGET" = wsbridge ] && auth=(--jwt-secret "$SECRET")
  say "$name: $*"
  taskset -c 1 "$LOADGEN" --target "$TARGET" --ws "$WS" --api "${APIS##*,}" --pids "$PIDS" \
    --redis-pid "$REDIS_PID" "${auth[@]}" --json "$OUT/$name.json" --quiet "$@" \
    >>"$LOG" 2>&1 || say "$name: loadgen exited $? (see run.log)"
}

# negotiated NAME: whether the report says the clients negotiated permessage-deflate.
negotiated() { python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("negotiated",0) > 0 else 1)' "$OUT/$1.json" 2>/dev/null; }
unavailable() { echo "{\"config\": \"$1\", \"not_in_this_build\": true, \"why\": \"$2\"}" >"$OUT/$1.unavailable.json"; say "$1: $2"; }

CONFIGS=(wsbridge-off wsbridge-on socketio-off socketio-on)
for config in "${CONFIGS[@]}"; do
  if want wire; then
    if start "$config"; then
      loadgen "$config-wire" --scenario wire --deflate --clients 1000 --messages "$MESSAGES" \
        --rate 20 --payload "$PAYLOAD" --channel bench
      if [[ "$config" == *-on ]] && ! negotiated "$config-wire"; then
        unavailable "$config" "the server did not negotiate permessage-deflate"
      fi
    else
      unavailable "$config" "a replica did not start with ${DEFLATE_ENV[*]}"
    fi
    stop_all
  fi
  [ -e "$OUT/$config.unavailable.json" ] && continue
  if want idle; then
    if start "$config"; then
      loadgen "$config-idle" --scenario wire-idle --deflate --clients "$IDLE_CLIENTS" \
        --settle-ms 3000 --payload "$PAYLOAD" --channel bench
      if [[ "$config" == *-on ]] && ! negotiated "$config-idle"; then
        unavailable "$config" "the server did not negotiate permessage-deflate"
      fi
    else
      unavailable "$config" "a replica did not start with ${DEFLATE_ENV[*]}"
    fi
    stop_all
  fi
done

if want publish; then
  for via in stream client; do
    start wsbridge-off
    backend_pid=
    if [ "$via" = stream ]; then
      # The backend is server side: pinned with the gateways. Its chat handler posts
      # {"from":..,"text":DATA} to the channel named in the entry.
      REDIS_URL=redis://127.0.0.1:$REDIS_PORT WSBRIDGE_API=${APIS%%,*} RUST_LOG=warn \
        taskset -c 0 "$BACKEND" --block-ms 1000 >>"$OUT/backend.log" 2>&1 &
      backend_pid=$!; disown "$backend_pid"; PIDS_TO_KILL+=("$backend_pid")
    fi
    loadgen "wsbridge-publish-$via" --scenario publish --publish-via "$via" --clients "${PUBLISH_CLIENTS:-1000}" \
      --publishers 10 --messages "$MESSAGES" --rate 20 --payload "$PAYLOAD" --channel "${PUBLISH_CHANNEL:-room:bench}" \
      --pids "$PIDS${backend_pid:+,$backend_pid}"
    if [ "$via" = client ] && ! python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["exact"] else 1)' "$OUT/wsbridge-publish-client.json" 2>/dev/null; then
      unavailable wsbridge-publish-client "client publish frames were not taken (not in this build?)"
    fi
    stop_all
  done
fi

{
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "rustc: $(rustc --version)"
  echo "node: $(node --version)"
  echo "commit: $(git rev-parse --short HEAD)"
} >"$OUT/machine.txt"
python3 bench/compression_report.py "$OUT" | tee "$OUT/results.md"
say "results: $OUT/results.md"
