#!/usr/bin/env bash
# RFC 6455 conformance: the Autobahn TestSuite's fuzzingclient cases, run by kosoku (a Python 3
# runner of the Autobahn cases; the original autobahntestsuite package needs Python 2), against
# the gateway's own WebSocket layer through examples/autobahn_echo.rs. Compression cases (12.*,
# 13.*) are excluded: wsbridge does not offer permessage-deflate. Every other case must be OK,
# NON-STRICT or INFORMATIONAL. Prints a summary; reports land in target/autobahn/.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'kosoku==0.1.0'
cargo build --quiet --example autobahn_echo

out=target/autobahn
rm -rf "$out"
mkdir -p "$out"
target/debug/examples/autobahn_echo 127.0.0.1:0 > "$out/echo.log" 2>&1 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^echo listening on //p' "$out/echo.log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "autobahn_echo did not start"; cat "$out/echo.log"; exit 1; }

echo "==> Autobahn fuzzingclient against $addr (excluding 12.* and 13.*)"
timeout 900 kosoku -m fuzzingclient -x '12.*' -x '13.*' -o "$out/reports" "$addr" > "$out/kosoku.log" 2>&1 || true
tail -n 3 "$out/kosoku.log"

python3 - "$out/reports" <<'PY'
import collections, glob, json, sys
allowed = {"OK", "NON-STRICT", "INFORMATIONAL"}
by_behavior = collections.Counter()
by_group = collections.defaultdict(collections.Counter)
bad = []
for path in glob.glob(sys.argv[1] + "/*_case_*.json"):
    case = json.load(open(path))
    behavior, close = case["behavior"], case["behaviorClose"]
    by_behavior[behavior] += 1
    by_group[case["id"].split(".")[0]][behavior] += 1
    if behavior not in allowed or close not in allowed:
        bad.append((case["id"], behavior, close, case.get("description", "")))
total = sum(by_behavior.values())
print("Autobahn summary: %d cases: %s" % (total, ", ".join("%s %d" % kv for kv in sorted(by_behavior.items()))))
for group in sorted(by_group, key=int):
    print("  %-3s %s" % (group, ", ".join("%s %d" % kv for kv in sorted(by_group[group].items()))))
if total < 290:
    print("too few cases ran (%d): the runner failed" % total)
    sys.exit(1)
for case_id, behavior, close, description in sorted(bad):
    print("  FAILED %s: behavior=%s close=%s — %s" % (case_id, behavior, close, description))
print("%d passed, %d failed" % (total - len(bad), len(bad)))
sys.exit(1 if bad else 0)
PY
