# Shared by bench/durable_acks.sh, bench/growth.sh, bench/inbound_redis.sh and bench/soak.sh;
# sourced from the repository root with OUT set to the results folder (created).
#
# Sets GW and LOADGEN (release builds, made here unless WSBRIDGE_BIN and LOADGEN_BIN are
# given), and kills every process whose pid is added to PIDS when the script exits.

ROOT=$(pwd)
if [ -z "${WSBRIDGE_BIN:-}" ] || [ -z "${LOADGEN_BIN:-}" ]; then
  cargo build --release --bin wsbridge --example loadgen 2>>"$OUT/build.log"
fi
GW=${WSBRIDGE_BIN:-$ROOT/target/release/wsbridge}
LOADGEN=${LOADGEN_BIN:-$ROOT/target/release/examples/loadgen}

# A free loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Runs the command until it succeeds, 30 s at most.
wait_for() { for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "timed out: $*" >&2; exit 1; }
# CPU seconds (user + system) a process has used.
cpu_s() { awk '{ split($0, a, ") "); split(a[2], f, " "); print (f[12] + f[13]) / 100 }' "/proc/$1/stat"; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Starts a redis-server on loopback port $1, on CPU 0 beside the gateways, its files under
# $OUT/redis-$1 (further arguments are passed on: persistence, by default none); sets REDIS_PID
# and returns once it answers.
redis_on_cpu0() {
  local port=$1; shift
  local args=("$@")
  [ ${#args[@]} -gt 0 ] || args=(--appendonly no)
  mkdir -p "$OUT/redis-$port"
  taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save '' "${args[@]}" \
    --dir "$OUT/redis-$port" --logfile "$OUT/redis-$port.log" &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_for redis-cli -p "$port" ping
}
