#!/usr/bin/env bash
# One command for a local stack: Redis on 127.0.0.1:6379 (started here unless one answers there;
# installed with apt-get when missing) and wsbridge with config/wsbridge.toml on
# ws://127.0.0.1:8080/ws (backend API http://127.0.0.1:8081).
#   REPLICAS=2 examples/local-stack.sh   adds a second replica: ws://127.0.0.1:8090/ws, API :8091
#
# It prints each replica's address and process id. The stack runs until every replica has
# stopped, or until Ctrl-C: kill one replica (kill <its pid>) and the other replica and Redis
# keep running, so clients can fail over to it. Ctrl-C stops everything this script started.
# Redis may be stopped meanwhile (redis-cli shutdown) and started again by hand; a Redis you
# started yourself is yours to stop (redis-cli shutdown).
#
# Settings (environment), for running it beside another stack, as the tests do:
#   REDIS_PORT     Redis's port (6379)
#   REDIS_DIR      Redis's data directory when started here (target/local-redis)
#   PORT           the first replica's WebSocket port (8080); its API is PORT+1, and the second
#                  replica's ports are PORT+10 and PORT+11
#   WSBRIDGE_BIN   the gateway binary to run (default: target/release/wsbridge, built here with
#                  cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."

redis_port=${REDIS_PORT:-6379}
redis_dir=${REDIS_DIR:-$PWD/target/local-redis}
port=${PORT:-8080}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v redis-server >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  mkdir -p "$redis_dir"
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$redis_dir" --appendonly yes \
    --logfile "$redis_dir/redis.log" &
  pids+=($!)
  until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
  echo "==> redis-server on 127.0.0.1:$redis_port (data in $redis_dir), pid ${pids[-1]}"
fi

bin=${WSBRIDGE_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=target/release/wsbridge
fi

# Replica N (1 or 2) on PORT + 10*(N-1), its API one port above.
declare -A names
start_replica() {
  local ws=$(($1)) api=$(($1 + 1))
  WSBRIDGE__SERVER__LISTEN=127.0.0.1:$ws WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$api \
    WSBRIDGE__REDIS__URL=redis://127.0.0.1:$redis_port \
    "$bin" --config config/wsbridge.toml &
  pids+=($!)
  names[$!]="the replica on ws://127.0.0.1:$ws/ws (API http://127.0.0.1:$api)"
  echo "==> ${names[$!]}, pid $!"
}
start_replica "$port"
if [ "${REPLICAS:-1}" -ge 2 ]; then
  start_replica "$((port + 10))"
fi

# Only the gateways end the stack, and only once all of them have stopped: Redis may be stopped
# and restarted meanwhile, and a killed replica leaves the other one serving.
running=("${!names[@]}")
while [ ${#running[@]} -gt 0 ]; do
  status=0
  wait -n -p done "${running[@]}" || status=$?
  echo "==> ${names[$done]} (pid $done) exited with status $status"
  left=()
  for p in "${running[@]}"; do [ "$p" = "$done" ] || left+=("$p"); done
  running=("${left[@]+"${left[@]}"}")
done
echo "==> every replica has stopped; stopping the rest"
