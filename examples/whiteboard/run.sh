#!/usr/bin/env bash
# The whiteboard on a local cluster, in one command:
#
#   examples/whiteboard/run.sh        then open http://127.0.0.1:8000/ in two browser windows
#
# It starts (installing redis-server and nginx with apt-get when missing):
#   - Redis on 127.0.0.1:6379 (its own, with an append-only file, unless one already answers);
#   - three wsbridge replicas, wsbridge-1..3, WebSockets on :9001-9003, backend API on :9011-9013;
#   - nginx on :8000: the page, and /ws balanced over the replicas (least_conn);
#     and on :8001 the backend API balanced over the replicas, for the backend;
#   - the whiteboard backend (examples/backends/, Rust by default) reading the stream "board".
# Logs and pid files go to target/whiteboard/. Kill a replica to see the pages move to the
# others and catch up (the command is printed when everything is up). Ctrl-C stops everything.
#
# Settings (environment): HTTP_PORT (8000), API_LB_PORT (8001), REDIS_PORT (6379),
# WS_PORTS ("9001 9002 9003"), API_PORTS ("9011 9012 9013"), PREFIX (wsbridge: Redis key
# prefix), BACKEND (rust | python | node), BALANCE (least_conn | ip_hash: nginx's choice of
# replica for each page; nginx.conf says why least_conn), PROFILE (release | debug),
# STATE (target/whiteboard: logs, pid files, nginx config, Redis data).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

HTTP_PORT=${HTTP_PORT:-8000}
API_LB_PORT=${API_LB_PORT:-8001}
REDIS_PORT=${REDIS_PORT:-6379}
read -r -a WS <<<"${WS_PORTS:-9001 9002 9003}"
read -r -a API <<<"${API_PORTS:-9011 9012 9013}"
PREFIX=${PREFIX:-wsbridge}
BACKEND=${BACKEND:-rust}
PROFILE=${PROFILE:-release}
BALANCE=${BALANCE:-least_conn}
STATE=${STATE:-$ROOT/target/whiteboard}
[ ${#WS[@]} -eq 3 ] && [ ${#API[@]} -eq 3 ] || { echo "WS_PORTS and API_PORTS need three ports each" >&2; exit 2; }
case "$BACKEND" in rust | python | node) ;; *) echo "BACKEND must be rust, python or node, not '$BACKEND'" >&2; exit 2 ;; esac
case "$BALANCE" in least_conn | ip_hash) ;; *) echo "BALANCE must be least_conn or ip_hash, not '$BALANCE'" >&2; exit 2 ;; esac
case "$PROFILE" in release | debug) ;; *) echo "PROFILE must be release or debug, not '$PROFILE'" >&2; exit 2 ;; esac
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "==> building ($PROFILE)"
profile_flag=()
[ "$PROFILE" = release ] && profile_flag=(--release)
cargo build --quiet "${profile_flag[@]}" --bin wsbridge
case "$BACKEND" in
  rust) cargo build --quiet "${profile_flag[@]}" --example backend
    backend_cmd=("$ROOT/target/$PROFILE/examples/backend") ;;
  python) python3 -c 'import redis, msgpack' 2>/dev/null ||
      python3 -m pip install --quiet --disable-pip-version-check -r examples/backends/python/requirements.txt
    backend_cmd=(python3 -u "$ROOT/examples/backends/python/backend.py") ;;
  node) [ -d examples/backends/node/node_modules ] || npm ci --silent --prefix examples/backends/node
    backend_cmd=(node "$ROOT/examples/backends/node/backend.mjs") ;;
esac

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# Waits until GET http://127.0.0.1:$2$3 answers 200 (bash's /dev/tcp: no curl needed) while
# process $1 lives; when it dies first (a port already taken, say), shows the end of its log $4.
wait_http() {
  local pid=$1 port=$2 path=$3 log=$4 i
  for i in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$log ended the process; its last lines:" >&2
      tail -5 "$log" >&2
      return 1
    fi
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
      if head -1 <&3 | grep -q ' 200 '; then exec 3>&-; return 0; fi
      exec 3>&-
    fi
    sleep 0.1
  done
  echo "127.0.0.1:$port$path did not answer 200 in 30 s; see $log" >&2
  return 1
}

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "==> using the Redis that answers on 127.0.0.1:$REDIS_PORT"
else
  mkdir -p "$STATE/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE/redis" --appendonly yes \
    --logfile "$STATE/redis.log" &
  pids+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "==> redis-server on 127.0.0.1:$REDIS_PORT (data in $STATE/redis)"
fi

for i in 1 2 3; do
  WSBRIDGE__SERVER__LISTEN="127.0.0.1:${WS[i - 1]}" \
    WSBRIDGE__SERVER__API_LISTEN="127.0.0.1:${API[i - 1]}" \
    WSBRIDGE__SERVER__REPLICA_ID="wsbridge-$i" \
    WSBRIDGE__REDIS__URL="redis://127.0.0.1:$REDIS_PORT" \
    WSBRIDGE__REDIS__PREFIX="$PREFIX" \
    "$ROOT/target/$PROFILE/wsbridge" --config examples/whiteboard/wsbridge.toml \
    >"$STATE/replica-$i.log" 2>&1 &
  pids+=($!)
  echo $! >"$STATE/replica-$i.pid"
done
for i in 1 2 3; do
  wait_http "$(cat "$STATE/replica-$i.pid")" "${API[i - 1]}" /readyz "$STATE/replica-$i.log"
done
echo "==> wsbridge-1..3: ws://127.0.0.1:{${WS[0]},${WS[1]},${WS[2]}}/ws, API :{${API[0]},${API[1]},${API[2]}}"

sed -e "s|@STATE@|$STATE|g" -e "s|@ROOT@|$ROOT|g" -e "s|@HTTP_PORT@|$HTTP_PORT|g" \
  -e "s|@API_LB_PORT@|$API_LB_PORT|g" -e "s|^        least_conn;|        $BALANCE;|" \
  -e "s|@WS_PORT_1@|${WS[0]}|g" -e "s|@WS_PORT_2@|${WS[1]}|g" -e "s|@WS_PORT_3@|${WS[2]}|g" \
  -e "s|@API_PORT_1@|${API[0]}|g" -e "s|@API_PORT_2@|${API[1]}|g" -e "s|@API_PORT_3@|${API[2]}|g" \
  examples/whiteboard/nginx.conf >"$STATE/nginx.conf"
"$NGINX" -p "$STATE" -c "$STATE/nginx.conf" -e "$STATE/nginx-error.log" -g 'daemon off;' &
pids+=($!)
wait_http $! "$HTTP_PORT" / "$STATE/nginx-error.log"
echo "==> nginx: the page on :$HTTP_PORT, the backend API on :$API_LB_PORT"

REDIS_URL="redis://127.0.0.1:$REDIS_PORT" WSBRIDGE_API="http://127.0.0.1:$API_LB_PORT" \
  PREFIX="$PREFIX" STREAM=board CONSUMER="whiteboard-$BACKEND-$$" \
  "${backend_cmd[@]}" >"$STATE/backend.log" 2>&1 &
pids+=($!)
echo $! >"$STATE/backend.pid"
echo "==> the $BACKEND backend reads $PREFIX:in:board (log: $STATE/backend.log)"

cat <<EOF

ready: open http://127.0.0.1:$HTTP_PORT/ in two browser windows and draw.
  each page shows the replica it is on; kill one, e.g.  kill \$(cat $STATE/replica-1.pid)
  other boards: http://127.0.0.1:$HTTP_PORT/?board=NAME;  logs: $STATE/*.log;  Ctrl-C stops all
EOF
# Runs until Ctrl-C (or until everything it started has exited).
wait
