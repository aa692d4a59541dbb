#!/usr/bin/env python3
"""Turns a bench/run.sh output folder (loadgen JSON reports) into Markdown tables with ratios.

    python3 bench/report.py DIR
"""

import csv
import glob
import json
import os
import sys

TARGETS = ["wsbridge", "socketio", "nchan"]
# examples/floor.rs: raw writes of the same frames to the same sockets (bench/run.sh --targets
# floor). The fan-out tables list it first and give every target's CPU per delivery as a
# multiple of it ("× floor"), from the same run.
FLOOR = "floor"


def load(folder, name):
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def num(value, digits=1):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def ratio(value, base):
    if value is None or base in (None, 0):
        return "–"
    return f"{value / base:.1f}×"


def exact(r):
    if r is None:
        return "–"
    mark = "yes" if r["exact"] else "**NO**"
    return f"{mark} ({r['delivered_total']:,}/{r['expected_total']:,})"


def heading(out, title, header):
    """A table's title, header row and separator row."""
    out.append(title)
    out.append(header)
    out.append("|" + "---|" * (header.count("|") - 1))


def main(folder):
    out = []
    machine = os.path.join(folder, "machine.txt")
    if os.path.exists(machine):
        out.append("Machine: " + "; ".join(open(machine).read().strip().splitlines()) + "\n")

    def cpu(r):
        return r and r.get("gateway_cpu_us_per_delivery")

    def lat(r, q):
        return r and r["latency_ms"].get(q)

    base = {s: load(folder, f"wsbridge-{s}") for s in ["paced", "burst", "direct", "user", "inbound"]}
    floor = {s: load(folder, f"{FLOOR}-{s}") for s in ["paced", "burst"]}

    def ratio2(value, base):
        """A ratio with two decimals: the floor ratios are close to 1."""
        if value is None or base in (None, 0):
            return "–"
        return f"{value / base:.2f}×"

    heading(out, "### Paced fan-out: 1,000 clients on 2 replicas, one channel, 20 msgs/s (20k deliveries/s)\n", "| target | exact (delivered/expected) | deliveries/s | gateway CPU µs/delivery | × wsbridge | × floor | p50 ms | p99 ms | p99.9 ms |")
    for t in [FLOOR] + TARGETS:
        r = load(folder, f"{t}-paced")
        if r:
            out.append(f"| {t} | {exact(r)} | {num(r['deliveries_per_s'], 0)} | {num(cpu(r), 2)} | "
                       f"{ratio(cpu(r), cpu(base['paced']))} | {ratio2(cpu(r), cpu(floor['paced']))} | "
                       f"{num(lat(r, 'p50'), 2)} | {num(lat(r, 'p99'), 2)} | {num(lat(r, 'p999'), 2)} |")
    if floor["paced"]:
        out.append("\nfloor: examples/floor.rs, one process writing the same frames to the same "
                   "1,000 sockets, one write per socket per message, pinned like the gateways.")

    heading(out, "\n### Burst: messages × 1,000 clients as fast as the publisher goes, default settings\n", "| target | messages | exact (delivered/expected) | deliveries/s | gateway CPU µs/delivery | × wsbridge | × floor | p99 ms |")
    for t in [FLOOR] + TARGETS:
        r = load(folder, f"{t}-burst")
        if r:
            out.append(f"| {t} | {r['messages']:,} (batch {r['batch'] if t != 'nchan' else 1}) | {exact(r)} | "
                       f"{num(r['deliveries_per_s'], 0)} | {num(cpu(r), 2)} | "
                       f"{ratio(cpu(r), cpu(base['burst']))} | {ratio2(cpu(r), cpu(floor['burst']))} | "
                       f"{num(lat(r, 'p99'), 1)} |")
    if floor["burst"]:
        out.append("\nfloor (burst): each publish call's 100 frames in one write per socket, "
                   "the least the kernel can be asked to do.")

    heading(out, "\n### 1:1 and user-targeted: rounds of one message to each of 1,000 connections (100 per call)\n", "| target | addressed to | exact | deliveries/s | gateway CPU µs/delivery | p50 ms | p99 ms |")
    for t, s, what in [("wsbridge", "direct", "connection"), ("wsbridge", "user", "user"),
                       ("socketio", "direct", "connection (socket id)")]:
        r = load(folder, f"{t}-{s}")
        if r:
            out.append(f"| {t} | {what} | {exact(r)} | {num(r['deliveries_per_s'], 0)} | {num(cpu(r), 2)} | "
                       f"{num(lat(r, 'p50'), 2)} | {num(lat(r, 'p99'), 2)} |")

    r = base["inbound"]
    xadd = None
    bench = os.path.join(folder, "redis-benchmark-xadd.csv")
    if os.path.exists(bench):
        rows = list(csv.reader(open(bench)))
        if len(rows) > 1:
            xadd = float(rows[1][1])
    if r:
        heading(out, "\n### Inbound: client `send` → stream entry (acked), 1,000 clients, 16 in flight each\n",
                "| | per second | gateway CPU µs/entry | ratio |")
        share = f"{r['deliveries_per_s'] / xadd * 100:.0f}% of XADD" if xadd else "–"
        out.append(f"| wsbridge acks ({exact(r)}) | {num(r['deliveries_per_s'], 0)} | {num(cpu(r), 2)} | {share} |")
        if xadd:
            out.append(f"| redis-benchmark XADD, pipelined (-P 16, 50 clients) | {num(xadd, 0)} | | 100% |")

    heading(out, "\n### Idle connections: RSS per connection (fresh processes, growth over the empty process)\n", "| target | connections | replicas | KiB per connection | × wsbridge |")
    base_idle = {}
    for t in TARGETS:
        for label in ["10k", "50k"]:
            if label == "10k":
                rs = [load(folder, f"{t}-idle10k")]
            else:
                rs = [load(folder, f"{t}-idle50k-{i}") for i in range(3)]
            rs = [r for r in rs if r]
            if not rs:
                continue
            conns = sum(r["clients"] for r in rs)
            per = [p["rss_kib_per_connection"] for r in rs for p in r["processes"]
                   if p.get("rss_kib_per_connection") is not None]
            kib = sum(per) / len(per) if per else None
            if t == "wsbridge":
                base_idle[label] = kib
            out.append(f"| {t} | {conns:,} | {len(per)} | {num(kib, 2)} | {ratio(kib, base_idle.get(label))} |")
    print("\n".join(out))


def soak(folder, png):
    """bench/soak.sh's samples: DIR/soak.md (a row a minute, growth after warm-up) and, with
    --png, DIR/soak.png (RSS, open fds, delivery latency and drops over time)."""
    samples = [json.loads(line) for line in open(os.path.join(folder, "samples.jsonl"))]
    rests = {(s["rest"], s["replica"]): s for s in samples if s.get("rest")}
    samples = [s for s in samples if not s.get("rest")]
    events = []
    events_path = os.path.join(folder, "events.log")
    if os.path.exists(events_path):
        events = [int(line.split()[0]) for line in open(events_path) if "redis restart" in line]
    times = sorted({s["t"] for s in samples})
    by = {(s["t"], s["replica"]): s for s in samples}

    def quantile(delta, q):
        # delta: {le: count in the interval}, cumulative; upper bucket bound in ms.
        total = delta.get("+Inf", 0)
        if total <= 0:
            return None
        for le, count in sorted(((float(k), v) for k, v in delta.items() if k != "+Inf")):
            if count >= q * total:
                return le * 1000
        return float("inf")

    rows = []
    for prev, t in zip(times, times[1:]):
        row = {"t": t}
        merged = {}
        for r in (0, 1):
            a, b = by.get((prev, r)), by.get((t, r))
            if not (a and b):
                continue
            row[f"rss{r}"] = b["rss_kib"] / 1024
            if b.get("heap_in_use") is not None:
                row[f"heap{r}"] = b["heap_in_use"] / 2**20
                row[f"held{r}"] = b["heap_held"] / 2**20
            row[f"fds{r}"] = b["fds"]
            row[f"conns{r}"] = b["connections"]
            row[f"dropped{r}"] = b["dropped"]
            for le, v in b["latency_buckets"].items():
                # A counter that went back (it cannot here: the replicas are not restarted).
                merged[le] = merged.get(le, 0) + max(0.0, v - a["latency_buckets"].get(le, 0))
        row["p50"] = quantile(merged, 0.5)
        row["p99"] = quantile(merged, 0.99)
        rows.append(row)

    def mean(key, lo, hi):
        vals = [r[key] for r in rows if lo <= r["t"] < hi and key in r]
        return sum(vals) / len(vals) if vals else None

    end = times[-1]
    warm = 120
    out = ["# Soak", "", f"{end} s, samples every ~10 s; Redis restarted at {events or 'never'} s.", ""]
    out.append("| replica | RSS MiB, 2nd-4th min | RSS MiB, last 3 min | growth | open fds, 2nd-4th min | open fds, last 3 min | growth |")
    out.append("|---|---|---|---|---|---|---|")
    for r in (0, 1):
        a, b = mean(f"rss{r}", warm, warm + 120), mean(f"rss{r}", end - 180, end + 1)
        fa, fb = mean(f"fds{r}", warm, warm + 120), mean(f"fds{r}", end - 180, end + 1)
        growth = lambda x, y: f"{(y / x - 1) * 100:+.1f}%" if x and y else "-"
        out.append(f"| {r} | {num(a, 1)} | {num(b, 1)} | {growth(a, b)} | {num(fa, 0)} | {num(fb, 0)} | {growth(fa, fb)} |")
    if rests:
        labels = [l for l in ("warm", "mid", "end") if any(k[0] == l for k in rests)]
        out += ["", "At rest (every load stopped, no connection, one heap trim interval later): after the warm-up"
                + (", at 2/3 of the run" if "mid" in labels else "") + " and at the end. Growth after warm-up, like for like.", "",
                "| replica | " + " | ".join(f"RSS MiB, {l}" for l in labels) + " | growth | "
                + " | ".join(f"heap in use MiB, {l}" for l in labels) + " | growth | open fds, " + " / ".join(labels) + " |",
                "|---|" + "---|" * (2 * len(labels) + 3)]
        growth = lambda x, y: f"{(y / x - 1) * 100:+.1f}%" if x and y else "-"
        for r in (0, 1):
            got = [rests.get((l, r)) for l in labels]
            if not all(got):
                continue
            rss = [g["rss_kib"] / 1024 for g in got]
            heap = [(g.get("heap_in_use") or 0) / 2**20 for g in got]
            out.append(f"| {r} | " + " | ".join(num(x, 1) for x in rss) + f" | {growth(rss[0], rss[-1])} | "
                       + " | ".join(num(x, 1) for x in heap) + f" | {growth(heap[0], heap[-1])} | "
                       + " / ".join(str(g["fds"]) for g in got) + " |")
    if any("heap0" in r for r in rows):
        out += ["", "The allocator's own figures (`wsbridge_heap_in_use_bytes`, `wsbridge_heap_held_bytes`): a leak",
                "grows the heap in use; memory the allocator keeps for reuse after a burst grows only what it holds.", "",
                "| replica | heap in use MiB, 2nd-4th min | last 3 min | growth | heap held MiB, 2nd-4th min | last 3 min | growth |",
                "|---|---|---|---|---|---|---|"]
        for r in (0, 1):
            a, b = mean(f"heap{r}", warm, warm + 120), mean(f"heap{r}", end - 180, end + 1)
            ha, hb = mean(f"held{r}", warm, warm + 120), mean(f"held{r}", end - 180, end + 1)
            out.append(f"| {r} | {num(a, 1)} | {num(b, 1)} | {growth(a, b)} | {num(ha, 1)} | {num(hb, 1)} | {growth(ha, hb)} |")
    out += ["", "| t (s) | RSS MiB 0 / 1 | heap in use MiB 0 / 1 | fds 0 / 1 | connections 0 / 1 | delivery p50 / p99 (ms, bucket bounds) | dropped 0 / 1 (total) |",
            "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["t"] // 60 == (row["t"] - 10) // 60 and row is not rows[-1]:
            continue  # one row a minute
        out.append(
            f"| {row['t']} | {num(row.get('rss0'), 1)} / {num(row.get('rss1'), 1)}"
            f" | {num(row.get('heap0'), 1)} / {num(row.get('heap1'), 1)} | {row.get('fds0', '-')} / {row.get('fds1', '-')}"
            f" | {num(row.get('conns0'), 0)} / {num(row.get('conns1'), 0)} | {num(row['p50'], 2)} / {num(row['p99'], 2)}"
            f" | {num(row.get('dropped0'), 0)} / {num(row.get('dropped1'), 0)} |"
        )
    open(os.path.join(folder, "soak.md"), "w").write("\n".join(out) + "\n")
    if not png:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    ts = [r["t"] for r in rows]
    for r in (0, 1):
        axes[0].plot(ts, [row.get(f"rss{r}") for row in rows], label=f"replica {r} RSS")
        if any(f"heap{r}" in row for row in rows):
            axes[0].plot(ts, [row.get(f"heap{r}") for row in rows], linestyle="--", label=f"replica {r} heap in use")
        axes[1].plot(ts, [row.get(f"fds{r}") for row in rows], label=f"replica {r}")
        axes[3].plot(ts, [row.get(f"dropped{r}") for row in rows], label=f"replica {r}")
    axes[2].plot(ts, [row["p50"] for row in rows], label="p50")
    axes[2].plot(ts, [row["p99"] for row in rows], label="p99")
    axes[2].set_yscale("log")
    for ax, title in zip(axes, ["memory (MiB)", "open file descriptors", "delivery latency (ms, per 10 s)", "deliveries dropped (total)"]):
        ax.set_ylabel(title)
        ax.legend(loc="upper left")
        for e in events:
            ax.axvline(e, color="red", linestyle=":")
    axes[-1].set_xlabel("seconds (red: Redis restarted)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "soak.png"), dpi=80)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--soak":
        soak(sys.argv[2], "--png" in sys.argv[3:])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else sorted(glob.glob("target/bench/*"))[-1])
