#!/usr/bin/env bash
# Before/after comparison of two builds of wsbridge, in one run on this machine.
#
#   bench/compare.sh BEFORE_DIR AFTER_DIR [--quick] [--repeats N] [--loadgen PATH] [--out DIR]
#                    [--scenarios paced,burst,idle10k,inbound] [--dry-run]
#   bench/compare.sh --report DIR          # the table again, from a finished (or cut short) run
#
# e.g.  bench/compare.sh /work/bench-before target/release
#
# A DIR holds release binaries: DIR/wsbridge, and the load generator as DIR/loadgen or
# DIR/examples/loadgen (the layout of target/release). When DIR/wsbridge.toml exists, that build's
# gateway reads it instead of this checkout's config/wsbridge.toml (the config refuses unknown
# keys, so a build may need the file from its own commit). Nothing is built: the binaries are
# used as given, and their SHA-256 are recorded.
#
# Four scenarios of bench/run.sh, wsbridge only, each run by bench/run.sh itself (same loadgen
# arguments, same pinning: Redis and 2 gateway replicas on CPU 0, the load generator on CPU 1,
# a fresh Redis and fresh replicas for every measurement):
#   paced     1,000 clients, one channel, 20 msgs/s: gateway CPU µs per delivery
#   burst     1,000 messages x 1,000 clients, batches of 100: CPU µs per delivery, deliveries/s
#   idle10k   10,000 clients, each joined to a channel, on 2 replicas: RSS KiB per connection
#   inbound   1,000 clients x 100 sends, 16 in flight: acks/s, CPU µs per ack (and
#             redis-benchmark's pipelined XADD on the same Redis, as a check that the machine
#             and Redis did not change between the two sides)
# Order: scenario by scenario, and within a scenario before, after, before, after, ... (ABAB),
# --repeats pairs (default 2; --quick: 1 pair with bench/run.sh's short settings).
#
# One load generator for both sides, so that only the gateway differs: BEFORE_DIR's by default
# (the one the baseline was measured with; examples/loadgen does not link the gateway's library,
# so a gateway refactor does not change it), or --loadgen PATH (e.g. the after build's, when the
# refactor changed the protocol or the loadgen's flags).
#
# Results, in the --out folder (default target/bench/compare-<time>): <scenario>-<before|after>-<n>/
# (bench/run.sh's output folder: JSON report, run.log, gateway logs) and compare.md (the table).
# --dry-run prints the bench/run.sh commands instead of running them.
# Time: about 3-4 minutes with the default 2 pairs (each paced run alone is 20 s of publishing);
# --quick about 1 minute.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

usage() { sed -n '4,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SCENARIOS=paced,burst,idle10k,inbound
QUICK=0 REPEATS= LOADGEN_PATH= OUT= DRY=0 REPORT_ONLY= DIRS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --repeats) REPEATS=$2; shift ;;
    --loadgen) LOADGEN_PATH=$2; shift ;;
    --out) OUT=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --dry-run) DRY=1 ;;
    --report) REPORT_ONLY=$2; shift ;;
    -h|--help) usage ;;
    -*) echo "bench/compare.sh: unknown argument $1" >&2; usage ;;
    *) DIRS+=("$1") ;;
  esac
  shift
done

# The table, from the folders of a run.
report() {
  python3 - "$1" <<'PY'
import csv, glob, json, os, re, statistics, sys

out_dir = sys.argv[1]
runs = {}  # (scenario, side) -> [(n, folder)]
for d in glob.glob(os.path.join(out_dir, "*-*-*")):
    m = re.fullmatch(r"(paced|burst|idle10k|inbound)-(before|after)-(\d+)", os.path.basename(d))
    if m and os.path.isdir(d):
        runs.setdefault((m[1], m[2]), []).append((int(m[3]), d))

def reports(scenario, side):
    got = []
    for _, d in sorted(runs.get((scenario, side), [])):
        p = os.path.join(d, f"wsbridge-{scenario}.json")
        got.append((json.load(open(p)), d) if os.path.exists(p) else (None, d))
    return got

def idle_kib(r):
    per = [p["rss_kib_per_connection"] for p in r["processes"] if p.get("rss_kib_per_connection") is not None]
    return sum(per) / len(per) if per else None

def xadd(r, d):
    p = os.path.join(d, "redis-benchmark-xadd.csv")
    if not os.path.exists(p):
        return None
    rows = list(csv.reader(open(p)))
    return float(rows[1][1]) if len(rows) > 1 else None

def cpu(r, d): return r.get("gateway_cpu_us_per_delivery")
def rate(r, d): return r.get("deliveries_per_s")
def p99(r, d): return (r.get("latency_ms") or {}).get("p99")

rows = [  # scenario, metric, function, digits, lower is better
    ("paced", "gateway CPU µs/delivery", cpu, 2, True),
    ("paced", "p99 latency ms", p99, 1, True),
    ("burst", "gateway CPU µs/delivery", cpu, 2, True),
    ("burst", "deliveries/s", rate, 0, False),
    ("idle10k", "RSS KiB/connection (channel joined)", lambda r, d: idle_kib(r), 2, True),
    ("inbound", "acks/s", rate, 0, False),
    ("inbound", "gateway CPU µs/ack", cpu, 2, True),
    ("inbound", "control: redis-benchmark XADD/s (same Redis, no gateway)", xadd, 0, False),
]

def fmt(v, digits):
    return "–" if v is None else f"{v:,.{digits}f}"

def describe(scenario):
    for side in ("before", "after"):
        for r, _ in reports(scenario, side):
            if r:
                c, m = f"{r['clients']:,}", f"{r['messages']:,}"
                return {"paced": f"{c} clients, {m} messages at {r.get('rate', 0):g}/s",
                        "burst": f"{m} messages × {c} clients, batch {r.get('batch')}",
                        "idle10k": f"{c} clients on {r.get('replicas')} replicas",
                        "inbound": f"{c} clients × {m} sends"}[scenario]
    return ""

lines = []
header = "| scenario | metric | before | after | after/before | runs (before; after) | exact |"
lines += [header, "|" + "---|" * (header.count("|") - 1)]
for scenario, metric, f, digits, lower in rows:
    vals, exacts = {}, []
    for side in ("before", "after"):
        rs = reports(scenario, side)
        vals[side] = [f(r, d) if r else None for r, d in rs]
        exacts += [r["exact"] if r else None for r, d in rs]
    if not vals["before"] and not vals["after"]:
        continue
    mean = {s: (statistics.mean([v for v in vals[s] if v is not None])
                if any(v is not None for v in vals[s]) else None) for s in vals}
    ratio = (f"{mean['after'] / mean['before']:.2f}×"
             if mean["before"] and mean["after"] is not None else "–")
    each = "; ".join(", ".join(fmt(v, digits) for v in vals[s]) or "–" for s in ("before", "after"))
    if scenario == "idle10k" or metric.startswith("control"):
        ex = ""
    elif None in exacts:
        ex = "**report missing**"
    else:
        ex = "yes" if all(exacts) else "**NO**"
    name = {"paced": "paced fan-out", "burst": "burst", "idle10k": "idle 10k",
            "inbound": "inbound"}[scenario]
    if describe(scenario):
        name += f" ({describe(scenario)})"
    lines.append(f"| {name} | {metric}{' (lower is better)' if lower else ''} | "
                 f"{fmt(mean['before'], digits)} | {fmt(mean['after'], digits)} | {ratio} | {each} | {ex} |")

meta = os.path.join(out_dir, "compare.txt")
if os.path.exists(meta):
    print(open(meta).read().strip() + "\n")
print("\n".join(lines))
print("\nbefore/after: the mean of the runs; the runs are in the order they ran (ABAB). "
      "Exact: every run of the scenario delivered exactly what was expected.")
PY
}

if [ -n "$REPORT_ONLY" ]; then
  report "$REPORT_ONLY"
  exit 0
fi

[ ${#DIRS[@]} -eq 2 ] || usage
BEFORE=$(cd "${DIRS[0]}" && pwd) || { echo "bench/compare.sh: no directory ${DIRS[0]}" >&2; exit 2; }
AFTER=$(cd "${DIRS[1]}" && pwd) || { echo "bench/compare.sh: no directory ${DIRS[1]}" >&2; exit 2; }
[ -z "$REPEATS" ] && { if [ "$QUICK" = 1 ]; then REPEATS=1; else REPEATS=2; fi; }
for s in ${SCENARIOS//,/ }; do
  case "$s" in paced|burst|idle10k|inbound) ;; *) echo "bench/compare.sh: unknown scenario $s" >&2; exit 2 ;; esac
done
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || { echo "bench/compare.sh: --repeats takes a positive number" >&2; exit 2; }

find_loadgen() {
  local d=$1
  if [ -x "$d/loadgen" ]; then echo "$d/loadgen"
  elif [ -x "$d/examples/loadgen" ]; then echo "$d/examples/loadgen"
  fi
}
for d in "$BEFORE" "$AFTER"; do
  [ -x "$d/wsbridge" ] || { echo "bench/compare.sh: no executable $d/wsbridge" >&2; exit 2; }
done
if [ -n "$LOADGEN_PATH" ]; then
  LOADGEN=$(cd "$(dirname "$LOADGEN_PATH")" && pwd)/$(basename "$LOADGEN_PATH")
else
  LOADGEN=$(find_loadgen "$BEFORE")
fi
[ -n "$LOADGEN" ] && [ -x "$LOADGEN" ] || {
  echo "bench/compare.sh: no load generator (looked for $BEFORE/loadgen, $BEFORE/examples/loadgen; give --loadgen PATH)" >&2
  exit 2
}
config_of() { if [ -f "$1/wsbridge.toml" ]; then echo "$1/wsbridge.toml"; else echo "$ROOT/config/wsbridge.toml"; fi; }

[ -z "$OUT" ] && OUT=$ROOT/target/bench/compare-$(date -u +%Y%m%dT%H%M%SZ)
RUN_ARGS=(--targets wsbridge)
[ "$QUICK" = 1 ] && RUN_ARGS+=(--quick)

# One measurement: bench/run.sh with one scenario, one side's gateway, the common loadgen.
measure() {
  local scenario=$1 side=$2 n=$3 dir
  if [ "$side" = before ]; then dir=$BEFORE; else dir=$AFTER; fi
  local folder="$OUT/$scenario-$side-$n"
  local cmd=(env WSBRIDGE_BIN="$dir/wsbridge" LOADGEN_BIN="$LOADGEN" WSBRIDGE_CONFIG="$(config_of "$dir")"
             "$HERE/run.sh" "${RUN_ARGS[@]}" --scenarios "$scenario" --out "$folder")
  if [ "$DRY" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    return
  fi
  echo "==> $(date -u +%H:%M:%S) $scenario $side $n" >&2
  "${cmd[@]}" >"$OUT/$scenario-$side-$n.out" 2>&1 \
    || echo "==> $scenario $side $n: bench/run.sh exited $? (see $folder/run.log, $OUT/$scenario-$side-$n.out)" >&2
}

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  {
    echo "Before: $BEFORE/wsbridge (sha256 $(sha256sum "$BEFORE/wsbridge" | cut -c1-12), config $(config_of "$BEFORE"))"
    echo "After: $AFTER/wsbridge (sha256 $(sha256sum "$AFTER/wsbridge" | cut -c1-12), config $(config_of "$AFTER"))"
    echo "Load generator, both sides: $LOADGEN (sha256 $(sha256sum "$LOADGEN" | cut -c1-12))"
    echo "Run: $(date -u +%Y-%m-%dT%H:%M:%SZ), checkout $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $([ "$QUICK" = 1 ] && echo quick || echo full), $REPEATS pair(s) per scenario"
    echo "Machine: kernel $(uname -r); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc); redis $(redis-server --version 2>/dev/null | sed 's/.*v=\([^ ]*\).*/\1/')"
  } | sed 's/$/  /' >"$OUT/compare.txt"
  cat "$OUT/compare.txt" >&2
fi

started=$SECONDS
for scenario in ${SCENARIOS//,/ }; do
  for n in $(seq 1 "$REPEATS"); do
    measure "$scenario" before "$n"
    measure "$scenario" after "$n"
  done
done
[ "$DRY" = 1 ] && exit 0

echo "==> done in $((SECONDS - started)) s" >&2
report "$OUT" | tee "$OUT/compare.md"
echo "==> results: $OUT/compare.md" >&2
