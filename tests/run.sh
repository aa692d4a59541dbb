#!/usr/bin/env bash
# The one command that runs every test, on a fresh machine with only the Rust toolchain:
# installs what the tests run for real when missing (Debian packages, the example backends'
# Python and npm packages, playwright-core), then builds everything (examples included), runs the
# Autobahn conformance cases against the gateway's WebSocket layer (tests/autobahn.sh), the
# deployment-file checks, the alert rules' unit tests (tests/alerts.sh: promtool), Schemathesis
# against the backend API's OpenAPI document (tests/schemathesis.sh), the frame fuzzer
# (tests/frames_fuzz.sh), the JavaScript client's tests (tests/js, against real replicas) and
# types (tests/ts: tsc, npm pack), the whiteboard in headless Chromium (tests/browser) and all
# Rust tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage says when it starts, in seconds since this script did (the suite must stay well
# under 15 minutes; CI prints these).
say() { echo "==> [${SECONDS}s] $*"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages the tests run for real: Redis (the backplane) and its Sentinel, Prometheus (the dashboard
# test evaluates every panel's query against it; its promtool unit-tests the alert rules), openssl (RS256 test keys) and nginx (the
# deployment example's config, in front of real replicas).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# tests/it/sentinel.rs: three Sentinels watch a primary and two replicas (without the package the
# fixture falls back to `redis-server --sentinel`, the same program).
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus) # tests/alerts.sh: promtool test rules
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v nginx >/dev/null 2>&1 || missing+=(nginx) # the example nginx configs (deploy, whiteboard)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm) # the JS client, Node backend, Playwright
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium) # tests/browser: the whiteboard in a real browser
command -v curl >/dev/null 2>&1 || missing+=(curl) # tests/schemathesis.sh
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv) # tests/frames_fuzz.sh
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
redis-server --version
prometheus --version 2>&1 | head -1

say "installing the example backends' packages (Python, Node) and playwright-core"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r examples/backends/python/requirements.txt
npm ci --silent --no-audit --no-fund --prefix examples/backends/node
npm ci --silent --no-audit --no-fund --prefix tests/browser
npm ci --silent --no-audit --no-fund --prefix tests/ts # TypeScript, for the JS client's types

say "cargo build --examples (tests/it/examples.rs runs the Rust backend example)"
cargo build --examples
say "RFC 6455 conformance (Autobahn TestSuite)"
bash tests/autobahn.sh
say "deployment files (examples/deploy, Dockerfile)"
bash tests/deploy.sh
say "alert rules (grafana/alerts.yml): promtool check rules, promtool test rules"
bash tests/alerts.sh
say "the backend API against docs/openapi.json (Schemathesis; Redis up, then down)"
bash tests/schemathesis.sh

say "JavaScript client and chat example (examples/js) against real replicas: node --test tests/js"
cargo build # the tests run target/debug/wsbridge
ws_flag=() # Node 22+ has a global WebSocket; Node 20/21 need the flag
node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' || ws_flag=(--experimental-websocket)
node "${ws_flag[@]}" --test --test-timeout=60000 tests/js/client.test.mjs tests/js/chat.test.mjs

# The JS client's types (examples/js/wsbridge-client.d.mts): declared for everything the module
# has (surface.mjs), right for a typed consumer and the examples that use the client (tsc), and
# the package installs as users install it (npm pack, npm install). ~6 s, and ~3 s of npm ci.
say "the JS client's types: tsc --noEmit -p tests/ts, and npm pack + install of examples/js"
node tests/ts/surface.mjs
tests/ts/node_modules/.bin/tsc --noEmit -p tests/ts # (not npx: it would fetch another `tsc` if missing)
tests/ts/node_modules/.bin/tsc --noEmit -p tests/ts/tsconfig.browser.json
bash tests/ts/pack.sh

# The client protocol fuzzed from docs/schema/client-frame.json and its negation (JSON and
# MessagePack) against a real replica; every answer valid under server-frame.json. ~15-25 s.
say "frames from the client-frame schema and its negation: tests/frames_fuzz.sh"
bash tests/frames_fuzz.sh

# The whiteboard (examples/whiteboard/run.sh: Redis, three replicas, nginx, the Rust backend) in
# headless Chromium; screenshots in target/artifacts/whiteboard/.
say "the whiteboard in Chromium: node --test tests/browser"
node --test --test-timeout=300000 tests/browser/whiteboard.test.mjs

# Four tests at a time, on any number of cores: most of the integration tests' time is spent
# waiting (Redis restarts, Sentinel failovers, timeouts), not computing. Measured on 2 cores:
# the three passes take 104 + 79 + 150 s instead of about 180 + 170 + 200 s, and pass the same.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}
say "cargo test"
cargo test --all-targets "$@"

# The same integration suite again with interest routing (outbound.routing = "interest"): every
# contract behaviour must hold under both routings. The replicas inherit the variables. This pass
# also sends every message's per-recipient work through the fan-out lanes, over three shards
# (fanout_lane_min_recipients = 0; by default only messages with 256 local recipients or more
# go there), so every ordering, reach and resume test runs against the lanes too. Skipped
# here: the Sentinel link tests (sentinel::; finding and following the primary does not depend on
# the routing, and they take ~45 s); the Sentinel failover under load (ha_load::) does run.
say "cargo test --test it, interest routing, every message on the fan-out lanes"
WSBRIDGE__OUTBOUND__ROUTING=interest WSBRIDGE__OUTBOUND__FANOUT_SHARDS=3 \
  WSBRIDGE__OUTBOUND__FANOUT_LANE_MIN_RECIPIENTS=0 cargo test --test it "$@" -- --skip sentinel::

# And against a Redis Cluster (three masters, created per test with redis-cli --cluster create),
# which needs interest routing; the example backends then run with --redis-cluster. Skipped
# there: the cluster tests (cluster::; they build their own clusters and run in the passes above),
# the Sentinel tests (sentinel:: and ha_load::; a Sentinel deployment is not a cluster, and they
# start their own primary, replicas and Sentinels in the passes above), the broadcast-against-interest
# comparison (broadcast cannot run on a cluster), and the tests that start their own single
# Redis whatever the pass (replicated::, lost_writes::, tls::, walkthrough::): here they would
# repeat the interest pass exactly.
say "cargo test --test it, on a Redis Cluster"
WSBRIDGE_TEST_REDIS=cluster WSBRIDGE__OUTBOUND__ROUTING=interest cargo test --test it "$@" -- \
  --skip cluster:: --skip sentinel:: --skip ha_load:: --skip routing::interest_routing_spares \
  --skip replicated:: --skip lost_writes:: --skip tls:: --skip walkthrough::
say "all tests passed"
