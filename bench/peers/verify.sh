#!/usr/bin/env bash
# End-to-end check of the benchmark peers, on loopback only:
#   - a throwaway redis-server on a free port,
#   - socket.io peer installed from npm into a temp dir (socketio/install.sh), two instances,
#   - two nchan instances (nchan/run.sh; installs nginx + libnginx-mod-nchan with apt if missing),
#   - verify.mjs: subscribers on instance A, publishes on instance B (and the other way round),
#     exact frames, late subscribers, bursts without loss.
# Everything started here is stopped on exit. Prints `N passed, N failed` last; exit 1 on failure.
#
#   bench/peers/verify.sh [socketio|nchan|all]    (default all)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
which="${1:-all}"
work="$(mktemp -d /tmp/wsbridge-peers-verify.XXXXXX)"
redis_pid=""; sio_pids=()

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cleanup() {
    set +e
    for p in "${sio_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for d in "$work/nchan-a" "$work/nchan-b"; do
        [[ -f "$d/nginx.pid" ]] && "$here/nchan/run.sh" stop "$d" >/dev/null
    done
    [[ -n "$redis_pid" ]] && kill -TERM "$redis_pid" 2>/dev/null
    for p in "${sio_pids[@]}" $redis_pid; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    rm -rf "$work"
}
trap cleanup EXIT

command -v redis-server >/dev/null || { echo "verify.sh: redis-server missing (apt-get install redis-server)" >&2; exit 1; }
redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$work/redis.pid" --logfile "$work/redis.log" --dir "$work"
for _ in $(seq 50); do [[ -s "$work/redis.pid" ]] && break; sleep 0.1; done
redis_pid="$(cat "$work/redis.pid")"
redis_url="redis://127.0.0.1:$redis_port"
echo "redis: $redis_url (pid $redis_pid)"

envs=()
if [[ "$which" == all || "$which" == socketio ]]; then
    "$here/socketio/install.sh" "$work/socketio" >/dev/null
    for inst in a b; do
        ws="$(free_port)"; api="$(free_port)"
        node "$work/socketio/server.mjs" --port "$ws" --api-port "$api" --redis "$redis_url" \
            > "$work/sio-$inst.out" 2> "$work/sio-$inst.err" &
        sio_pids+=("$!")
        for _ in $(seq 100); do grep -q '^listening ' "$work/sio-$inst.out" && break; sleep 0.1; done
        line="$(head -n1 "$work/sio-$inst.out")"
        [[ "$line" == "listening ws=$ws api=$api" ]] \
            || { echo "socket.io $inst did not start: $line $(cat "$work/sio-$inst.err")" >&2; exit 1; }
        echo "socket.io $inst: $line (pid $!)"
        up="$(echo "$inst" | tr a-z A-Z)"
        envs+=("SIO_${up}_WS=$ws" "SIO_${up}_API=$api")
    done
fi
if [[ "$which" == all || "$which" == nchan ]]; then
    for inst in a b; do
        port="$(free_port)"
        line="$("$here/nchan/run.sh" start "$work/nchan-$inst" "$port" "$redis_url")"
        echo "nchan $inst: $line"
        up="$(echo "$inst" | tr a-z A-Z)"
        envs+=("NCHAN_${up}=$port")
    done
fi

node_flags=()
node -e 'process.exit(typeof WebSocket === "undefined" ? 1 : 0)' 2>/dev/null \
    || node_flags+=(--experimental-websocket)
env "${envs[@]}" REDIS_PORT="$redis_port" node --no-warnings "${node_flags[@]}" "$here/verify.mjs"
