#!/usr/bin/env bash
# Broadcast against interest routing (outbound.routing), on 4 replicas sharing one Redis.
#
#   bench/routing.sh [--clients N] [--rounds N] [--rate R] [--out DIR]
#
# Scenario (loadgen --scenario rooms): N clients (1,000) spread over the 4 replicas; the clients
# of each replica join channels of their own, so every channel's members sit on one replica.
# Two room sizes: "large", one channel per replica (250 members each with 1,000 clients), and
# "small", one channel per client (1 member each). Each round publishes one message to every
# channel (through replica 1, 100 per call), R rounds/s (20: 20k deliveries/s with 1,000
# clients), for --rounds rounds (400). Gateways and Redis are pinned to CPU 0, the load
# generator to CPU 1. Each routing runs twice per room size, alternating, on fresh processes.
#
# Reported per run: exact delivery, gateway CPU per delivery (all 4 replicas), latency, and from
# the replicas' /metrics the pub/sub messages received and filtered (no local recipient) during
# the run, summed over the replicas. Results: DIR/<size>-<routing>-<n>.json and DIR/routing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CLIENTS=1000
ROUNDS=400
RATE=20
OUT=target/bench/routing-$(date -u +%Y%m%dT%H%M%SZ)
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) CLIENTS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "bench/routing.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if ! command -v redis-server >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --bin wsbridge --example loadgen
GW="$ROOT/target/release/wsbridge"
LOADGEN="$ROOT/target/release/examples/loadgen"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Sum of a counter over the replicas' /metrics.
scrape() {
  local name=$1 total=0 v
  for api in "${APIS[@]}"; do
    v=$(curl -sf "$api/metrics" | awk -v n="$name" '$1 == n { print $2 }')
    total=$(python3 -c "print($total + ${v:-0})")
  done
  echo "$total"
}

run() {
  local size=$1 routing=$2 n=$3 rooms
  if [ "$size" = large ]; then rooms=1; else rooms=$((CLIENTS / 4)); fi
  local report="$OUT/$size-$routing-$n.json"
  local rport; rport=$(free_port)
  redis-server --port "$rport" --save '' --appendonly no --daemonize yes \
    --pidfile "$OUT/redis.pid" >/dev/null
  sleep 0.3
  local rpid; rpid=$(cat "$OUT/redis.pid")
  taskset -a -p -c 0 "$rpid" >/dev/null
  local pids=() ws=() 
  APIS=()
  for i in 1 2 3 4; do
    local p q; p=$(free_port); q=$(free_port)
    WSBRIDGE__SERVER__LISTEN=127.0.0.1:$p WSBRIDGE__SERVER__API_LISTEN=127.0.0.1:$q \
      WSBRIDGE__REDIS__URL=redis://127.0.0.1:$rport WSBRIDGE__REDIS__PREFIX=bench \
      WSBRIDGE__OUTBOUND__ROUTING=$routing RUST_LOG=warn \
      taskset -c 0 "$GW" --config config/wsbridge.toml >"$OUT/gw-$routing-$n-$i.log" 2>&1 &
    pids+=($!); ws+=("ws://127.0.0.1:$p/ws"); APIS+=("http://127.0.0.1:$q")
  done
  for api in "${APIS[@]}"; do
    for _ in $(seq 100); do curl -sf "$api/readyz" >/dev/null && break; sleep 0.1; done
  done
  local received0 filtered0
  received0=$(scrape wsbridge_pubsub_received_total)
  filtered0=$(scrape wsbridge_pubsub_filtered_total)
  local ws_list pid_list
  ws_list=$(IFS=,; echo "${ws[*]}"); pid_list=$(IFS=,; echo "${pids[*]}")
  taskset -c 1 "$LOADGEN" --scenario rooms --rooms-per-endpoint "$rooms" --batch 100 \
    --clients "$CLIENTS" --messages "$ROUNDS" --rate "$RATE" --ws "$ws_list" \
    --api "${APIS[0]}" --pids "$pid_list" --quiet --json "$report" >/dev/null || true
  local received filtered
  received=$(python3 -c "print($(scrape wsbridge_pubsub_received_total) - $received0)")
  filtered=$(python3 -c "print($(scrape wsbridge_pubsub_filtered_total) - $filtered0)")
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1 || true
  python3 - "$report" "$received" "$filtered" <<'PY'
import json, sys
path, received, filtered = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
r = json.load(open(path))
r["pubsub_received"], r["pubsub_filtered"] = received, filtered
json.dump(r, open(path, "w"), indent=1)
PY
  echo "$size rooms, $routing, run $n: exact=$(python3 -c "import json;print(json.load(open('$report'))['exact'])") received=$received filtered=$filtered" >&2
}

for size in large small; do
  for n in 1 2; do
    run "$size" broadcast "$n"
    run "$size" interest "$n"
  done
done

python3 - "$OUT" "$CLIENTS" "$ROUNDS" "$RATE" > "$OUT/routing.md" <<'PY'
import json, sys
out, clients, rounds, rate = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
c = int(clients)
print(f"4 replicas, {clients} clients, {rounds} rounds at {rate} rounds/s, one message per channel per round\n")
print("| rooms | routing | run | delivered | pub/sub received (4 replicas) | filtered | filtered share | gateway CPU µs/delivery | p50 / p99 ms |")
print("|---|---|---|---|---|---|---|---|---|")
for size, label in (("large", f"4 × {c // 4} members"), ("small", f"{c} × 1 member")):
  for routing in ("broadcast", "interest"):
    for n in (1, 2):
        r = json.load(open(f"{out}/{size}-{routing}-{n}.json"))
        rec, fil = r["pubsub_received"], r["pubsub_filtered"]
        share = f"{100 * fil / rec:.0f}%" if rec else "-"
        lat = r.get("latency_ms") or {}
        print(f"| {label} | {routing} | {n} | {r['delivered_total']:,}/{r['expected_total']:,} | {rec:,.0f} | {fil:,.0f} | {share} "
              f"| {r['gateway_cpu_us_per_delivery']:.2f} | {lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} |")
PY
cat "$OUT/routing.md"
