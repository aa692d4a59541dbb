#!/usr/bin/env bash
# The backend API against its OpenAPI document (docs/openapi.json), by Schemathesis: property-based
# requests derived from the document (valid and invalid bodies, missing auth, wrong methods) sent
# to a live replica with a real Redis, every answer checked against the document (status code,
# content type, headers, body schema), invalid input refused with 4xx, valid input accepted.
#
#   phase 1, Redis up:   no 5xx at all.
#   phase 2, Redis down: the only 5xx is the documented 503 (redis_unavailable, or /readyz's
#                        reason); then Redis comes back on the same port and the replica must be
#                        ready again.
#
# The replica runs with api.keys set (the fuzzer sends the key, and checks that calls without it
# get 401) and with one [[channels]] pattern matching every channel with presence and history, so
# that any channel the fuzzer makes up is valid for /presence and /send answers carry offsets.
# The document is first checked to be valid OpenAPI 3.1 (openapi-spec-validator).
# Each phase must also have exercised what it claims (from its HAR record of every exchange):
# every action endpoint answered 2xx and 401 with Redis up, and 503 with Redis down. A crash or a
# hang fails the script (timeout, a per-request timeout, and the replica must still be alive after
# each phase). Output, with the HAR files, in target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  'schemathesis==4.32.5' 'openapi-spec-validator==0.9.0'
# First, the document itself must be valid OpenAPI 3.1, as client generators expect.
python3 -c 'import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1])))' \
  docs/openapi.json || { echo "docs/openapi.json is not a valid OpenAPI 3.1 document"; exit 1; }
cargo build --quiet --bin wsbridge

out=target/schemathesis
rm -rf "$out"
mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
key="schemathesis-key"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

start_redis() {
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    > "$out/redis.log" 2>&1 &
  redis_pid=$!
  disown "$redis_pid" # no job-control notice when it is killed below
  pids+=("$redis_pid")
}
start_redis

cat > "$out/wsbridge.toml" <<EOF
[server]
listen = "127.0.0.1:0"
api_listen = "127.0.0.1:0"
shutdown_drain_seconds = 2

[redis]
url = "redis://127.0.0.1:$redis_port"
prefix = "st"
connect_timeout_ms = 500
command_timeout_ms = 1000
health_interval_ms = 200
unhealthy_after_ms = 1000
reconnect_max_backoff_ms = 500

[api]
keys = ["$key"]

[[channels]]
pattern = "*"
presence = true
history_size = 5
history_ttl_seconds = 60
EOF
target/debug/wsbridge --config "$out/wsbridge.toml" > "$out/wsbridge.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")

api=""
for _ in $(seq 1 100); do
  api=$(sed -n 's/.* listening .*api=\([^ ]*\).*/\1/p' "$out/wsbridge.log" | head -1)
  [ -n "$api" ] && break
  sleep 0.1
done
[ -n "$api" ] || { echo "the replica did not start"; cat "$out/wsbridge.log"; exit 1; }
base="http://$api"

# Readiness as the document says it: 200 `ready`, or 503 with a reason.
ready() { [ "$(curl -s --max-time 2 -o /dev/null -w '%{http_code}' "$base/readyz")" = "$1" ]; }
wait_for() { # wait_for WHAT STATUS: /readyz answers STATUS within 15 s
  for _ in $(seq 1 150); do ready "$2" && return 0; sleep 0.1; done
  echo "the replica did not become $1 (/readyz never answered $2)"; tail -n 20 "$out/wsbridge.log"; exit 1
}
wait_for ready 200
# The replica serves the document it is checked against, byte for byte. (Schemathesis reads the
# file: loaded from the replica's URL it would leave GET /openapi.json itself out.)
curl -sf --max-time 5 "$base/openapi.json" | cmp -s - docs/openapi.json \
  || { echo "GET /openapi.json is not docs/openapi.json"; exit 1; }

# Every check Schemathesis has, apart from the ones about resources this API does not have
# (use_after_free, ensure_resource_availability, object_level_authorization: no resource is
# created and then read or deleted by id). Each phase is one bounded run: examples per operation,
# a per-request timeout (a hang is a failure), and `timeout` around the whole.
run_phase() { # run_phase NAME CONFIG MAX_EXAMPLES
  local name=$1 config=$2 examples=$3 status=0
  echo "==> Schemathesis, $name (docs/openapi.json against $base, $examples examples per operation)"
  # From inside $out: Schemathesis keeps its crash cache in ./.schemathesis.
  (cd "$out" && timeout 300 st --config-file "$config" run ../../docs/openapi.json --url "$base" \
    --header "Authorization: Bearer $key" \
    --exclude-checks use_after_free,ensure_resource_availability,object_level_authorization \
    --max-examples "$examples" --workers 1 --seed 19 --request-timeout 5 \
    --phases examples,coverage,fuzzing --generation-database none \
    --report har --report-dir "$name" --no-color > "$name.log" 2>&1) || status=$?
  tail -n 25 "$out/$name.log"
  [ "$status" -eq 0 ] || { echo "Schemathesis found answers the document does not allow ($name, exit $status): $out/$name.log"; exit 1; }
  kill -0 "$gw_pid" 2>/dev/null || { echo "the replica died during $name"; tail -n 30 "$out/wsbridge.log"; exit 1; }
  python3 - "$out/$name" "$name" <<'PY'
import collections, glob, json, sys
har = json.load(open(glob.glob(sys.argv[1] + "/har-*.json")[0]))
seen = collections.defaultdict(collections.Counter)
for entry in har["log"]["entries"]:
    path = "/" + entry["request"]["url"].split("/", 3)[3].split("?")[0]
    seen[(entry["request"]["method"], path)][entry["response"]["status"]] += 1
documented = [("POST", p) for p in ("/send", "/subscribe", "/unsubscribe", "/disconnect", "/presence", "/user_status")]
documented += [("GET", p) for p in ("/metrics", "/healthz", "/readyz", "/openapi.json")]
for op in documented:
    print("  %-5s %-13s %s" % (op + (", ".join("%d: %d" % kv for kv in sorted(seen[op].items())),)))
up = sys.argv[2] == "redis-up"
want = {op: ({"2xx", 401} if up else {503}) for op in documented[:6]}
want[("GET", "/readyz")] = {200} if up else {503}
missing = [(op, w) for op, ws in want.items() for w in ws
           if not any((w == "2xx" and 200 <= s < 300) or s == w for s in seen[op])]
# With Redis refusing connections nothing can have reached it: a write's 503 must say so (a
# "may have been delivered" would send the backend into needless duplicate handling).
for entry in har["log"]["entries"]:
    if entry["response"]["status"] == 503 and "/readyz" not in entry["request"]["url"]:
        message = json.loads(entry["response"]["content"]["text"])["error"]["message"]
        read = any(p in entry["request"]["url"] for p in ("/presence", "/user_status"))
        if ("ask again" if read else "nothing was sent") not in message:
            print("a 503 that does not say what happened: %s %s" % (entry["request"]["url"], message))
            sys.exit(1)
if missing:
    print("%s did not exercise: %s" % (sys.argv[2], ", ".join("%s %s -> %s" % (m, p, w) for (m, p), w in missing)))
    sys.exit(1)
PY
}

# Shared by both phases. /disconnect's `reason` is limited to 120 bytes of UTF-8 (a close frame's
# reason must fit 123), which JSON Schema cannot say: its maxLength counts characters. The
# document says maxLength 120 and "bytes" in words, which is exact for ASCII, so that operation
# is fuzzed with ASCII strings; every other operation gets the whole of Unicode.
common='
[[operations]]
include-path = "/disconnect"
[operations.generation]
codec = "ascii"
'

# Phase 1: Redis up, the default checks (no 5xx at all). An invalid body may also be refused
# with the documented 413 (an array longer than limits.max_batch_messages is batch_too_long).
cat > "$out/up.toml" <<EOF
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "405", "413"]
$common
EOF
run_phase redis-up up.toml 40

# Phase 2: Redis killed. A 503 is now an allowed answer to valid calls, but it still has to be
# one the document lists for that operation (status_code_conformance), with the documented body;
# nothing else of the 5xx range is. Invalid calls are still refused with 4xx: a body is
# validated whole before Redis is asked anything.
kill -9 "$redis_pid"
wait_for "not ready" 503
cat > "$out/down.toml" <<EOF
[checks.not_a_server_error]
expected-statuses = ["2XX", "3XX", "4XX", "503"]
[checks.positive_data_acceptance]
expected-statuses = ["2XX", "503"]
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "405", "413"]
$common
EOF
run_phase redis-down down.toml 10

# Redis back on the same port: the replica must be ready again.
start_redis
wait_for "ready again after Redis came back" 200
curl -sf --max-time 5 -XPOST -H "Authorization: Bearer $key" "$base/send" \
  -d '{"to":{"all":true},"data":"after the outage"}' > /dev/null \
  || { echo "POST /send failed after Redis came back"; exit 1; }
echo "schemathesis: both phases conform; the replica is ready again after the outage"
