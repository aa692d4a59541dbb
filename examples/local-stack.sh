#!/usr/bin/env bash
# One command for a local stack: Redis on 127.0.0.1:6379 (started here unless one answers there;
# installed with apt-get when missing) and wsbridge with config/wsbridge.toml.
#   REPLICAS=2 examples/local-stack.sh   adds a second replica: ws://127.0.0.1:8090/ws, API :8091
# Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v redis-server >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if ! redis-cli -p 6379 ping >/dev/null 2>&1; then
  mkdir -p target/local-redis
  redis-server --port 6379 --bind 127.0.0.1 --dir "$PWD/target/local-redis" --appendonly yes \
    --logfile "$PWD/target/local-redis/redis.log" &
  pids+=($!)
  until redis-cli -p 6379 ping >/dev/null 2>&1; do sleep 0.1; done
  echo "==> redis-server on 127.0.0.1:6379 (data in target/local-redis)"
fi

cargo build --release --quiet
gateways=()
if [ "${REPLICAS:-1}" -ge 2 ]; then
  WSBRIDGE__SERVER__LISTEN=127.0.0.1:8090 WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:8091 \
    target/release/wsbridge --config config/wsbridge.toml &
  gateways+=($!)
fi
target/release/wsbridge --config config/wsbridge.toml &
gateways+=($!)
pids+=("${gateways[@]}")
# Only the gateways end the stack: Redis may be stopped and restarted meanwhile (try it).
wait -n "${gateways[@]}"
