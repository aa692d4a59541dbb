#!/usr/bin/env python3
"""The tables of bench/presence.sh, from the reports in its output folder.

    python3 bench/presence_report.py target/bench/presence-<time>
"""
import glob
import json
import os
import re
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None


def commandstats(name):
    path = os.path.join(out, name + ".commandstats")
    calls = {}
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m and m.group(1) != "config|resetstat":
                calls[m.group(1)] = int(m.group(2))
    return calls


def f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


names = sorted({os.path.basename(p)[:-5] for p in glob.glob(os.path.join(out, "*.json"))})

costs = [n for n in names if n.startswith("cost-")]
if costs:
    print("### Cost per join: connect + subscribe + disconnect\n")
    print("| run | channel | clients | gateway CPU µs/join | Redis CPU µs/join | presence counted all after (s) | Redis commands per join (calls / clients) |")
    print("|---|---|---|---|---|---|---|")
    for n in costs:
        d = load(n)
        calls = commandstats(n)
        per = ", ".join(f"{k} {v / d['clients']:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v / d["clients"] >= 0.01)
        print(f"| {n} | {d['channel']} | {d['clients']:,} | {f(d['gateway_cpu_us_per_join'], '{:.0f}')} | {f(d['redis_cpu_us_per_join'], '{:.0f}')} | {f(d.get('presence_joined_s'))} | {per} |")
    print()

storms = [n for n in names if n.startswith("storm-")]
if storms:
    print("### Connection storm into one channel (2 replicas, 2 watchers, 100 probe subscribers at 50 msgs/s)\n")
    print("| run | channel | clients | connected (s) | presence count right (s) | watchers saw every join (s) | joins per watcher | frames to storm clients | gateway CPU s | Redis CPU s | probe delivered | probe p50 / p99 / max ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in storms:
        d = load(n)
        lat = d.get("probe_latency_ms") or {}
        joins = "-" if not d["watchers"] else f"{d['joins_per_watcher_min']:,}–{d['joins_per_watcher_max']:,}"
        print(f"| {n} | {d['channel']} | {d['clients']:,} | {f(d['connect_s'])} | {f(d.get('presence_converged_s'))} | {f(d.get('watchers_saw_all_joins_s')) if d['watchers'] else '-'} | {joins} | {d['member_frames']:,} | {f(d['storm_gateway_cpu_s'])} | {f(d['storm_redis_cpu_s'])} | {d.get('probe_delivered', 0):,}/{d.get('probe_expected', 0):,}{' (' + str(d['probe_publish_failed']) + ' publishes 503)' if d.get('probe_publish_failed') else ''} | {f(lat.get('p50'), '{:.1f}')} / {f(lat.get('p99'), '{:.1f}')} / {f(lat.get('max'), '{:.1f}')} |")
    print()

bigs = [n for n in names if n.startswith("big-")]
if bigs:
    print("### Read path: POST /presence on a channel written straight into Redis\n")
    print("| members | limit | calls | connections / users counted | members on the first page | p50 ms | p99 ms | Redis bytes (members hash, users hash) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sorted(bigs, key=lambda n: (int(n.split("-")[1]), n)):
        d = load(n)
        size = n.split("-")[1]
        mem = os.path.join(out, f"big-{size}.memory")
        mem = ", ".join(open(mem).read().split()) if os.path.exists(mem) else "-"
        lat = d["latency_ms"]
        print(f"| {int(size):,} | {d['limit'] or 'default'} | {d['calls']} | {d['connections']:,} / {d['users']:,} | {d['members_on_first_page']} | {lat['p50']:.2f} | {lat['p99']:.2f} | {mem} |")
    print()

real = [n for n in names if n in ("bigreal-limit100", "bigreal-default")]
if real:
    conv = load("bigreal-converge") or {}
    idle = [load(n) for n in names if n.startswith("bigreal-idle-")]
    print("### 100,002 real connections in one presence channel (6 replicas, 6 load generators)\n")
    if idle:
        print(f"connected in {max(d['connect_s'] for d in idle):.1f} s (slowest load generator), "
              f"{sum(d['connect_retries'] for d in idle)} retries, "
              f"{sum(d['rss_kib_per_connection'] for d in idle) / len(idle):.2f} KiB gateway RSS per connection; "
              f"presence counted {conv.get('members')} after {conv.get('seconds_from_start_until_counted', 0):.1f} s\n")
    print("| limit | calls | connections / users counted | members on the first page | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for n in real:
        d = load(n)
        lat = d["latency_ms"]
        print(f"| {d['limit'] or 'default'} | {d['calls']} | {d['connections']:,} / {d['users']:,} | {d['members_on_first_page']} | {lat['p50']:.2f} | {lat['p99']:.2f} |")
    print()

kills = [n for n in names if n.startswith("kill-")]
if kills:
    print("### SIGKILL of a replica holding N members: the other replica's watcher\n")
    print("| run | N | first leave (s) | all N leaves seen (s) | presence count right (s) | leaves seen |")
    print("|---|---|---|---|---|---|")
    for n in kills:
        d = load(n)
        print(f"| {n} | {d['clients']:,} | {f(d.get('first_leave_after_kill_s'))} | {f(d.get('all_leaves_after_kill_s'))} | {f(d.get('presence_after_kill_s'))} | {d.get('leaves_per_watcher_min')} |")
    print()

for m in sorted(glob.glob(os.path.join(out, "*.metrics"))):
    print(f"{os.path.basename(m)}: " + "; ".join(l.strip() for l in open(m)))
machine = os.path.join(out, "machine.txt")
if os.path.exists(machine):
    print("\n" + open(machine).read())
