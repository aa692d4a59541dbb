#!/usr/bin/env python3
"""The growth table from a bench/growth.sh results folder, as markdown on stdout.

    python3 bench/growth_report.py target/bench/growth-<time>

Reads one-N.json / six-I.json (loadgen reports), *.rss (replica pid, RSS KiB at start, RSS KiB
with every client joined and idle) and *.load (load average before and after).
"""
import json
import pathlib
import sys


def rss_rows(path):
    """(pid, KiB at start, KiB joined) per replica."""
    return [tuple(int(x) for x in line.split()) for line in path.read_text().split("\n") if line.strip()]


def load(path):
    """'1-min load before → after'."""
    if not path.exists():
        return "-"
    lines = path.read_text().split("\n")
    first = [line.split()[0] for line in lines if line.strip()]
    return " → ".join(first)


def ms(v):
    return "-" if v is None else f"{v:.1f}"


def main(out):
    out = pathlib.Path(out)
    print(f"# Growth with the audience ({out.name})\n")
    machine = out / "machine.txt"
    if machine.exists():
        print("Machine: " + "; ".join(machine.read_text().split("\n")).strip("; ") + "\n")

    ones = sorted(out.glob("one-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if ones:
        print("One replica; gateway and Redis on CPU 0, loadgen on CPU 1; the same deliveries/s for every size.\n")
        print("| subscribers | msgs/s | deliveries/s | gateway CPU µs/delivery | × smallest | floor µs/delivery (× smallest) | × floor | p50 ms | p99 ms "
              "| RSS KiB/conn joined, idle | RSS KiB/conn after | exact | load avg (1 min) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = None
        floor_base = None
        for p in ones:
            r = json.loads(p.read_text())
            cost = r.get("gateway_cpu_us_per_delivery")
            if base is None:
                base = cost
            ratio = f"{cost / base:.2f}×" if cost and base else "-"
            floor, vs_floor = "-", "-"
            fp = p.with_name(p.name.replace("one-", "floor-"))
            if fp.exists():
                f = json.loads(fp.read_text()).get("gateway_cpu_us_per_delivery")
                if f:
                    floor_base = floor_base or f
                    floor = f"{f:.2f} ({f / floor_base:.2f}×)"
                    vs_floor = f"{cost / f:.2f}×"
            idle = "-"
            rss = p.with_suffix(".rss")
            if rss.exists():
                (_, before, joined), = rss_rows(rss)
                idle = f"{(joined - before) / r['clients']:.2f}"
            after = r.get("rss_kib_per_connection")
            lat = r["latency_ms"]
            print(f"| {r['clients']:,} | {r['rate']:.2f} | {r['deliveries_per_s']:,.0f} | "
                  f"{cost:.2f} | {ratio} | {floor} | {vs_floor} | {ms(lat['p50'])} | {ms(lat['p99'])} | {idle} | "
                  f"{'-' if after is None else f'{after:.2f}'} | {'yes' if r['exact'] else 'NO'} | "
                  f"{load(p.with_name(p.stem + '.load'))} |")
        print()

    sixes = sorted(out.glob("six-*.json"))
    if sixes:
        rs = [json.loads(p.read_text()) for p in sixes]
        clients = sum(r["clients"] for r in rs)
        delivered = sum(r["delivered_total"] for r in rs)
        cpu = sum(r["gateway_cpu_s"] for r in rs)
        elapsed = max(r["elapsed_s"] for r in rs)
        p50 = [r["latency_ms"]["p50"] for r in rs if r["latency_ms"]["p50"] is not None]
        p99 = [r["latency_ms"]["p99"] for r in rs if r["latency_ms"]["p99"] is not None]
        rng = lambda v: f"{min(v):.0f}–{max(v):.0f}" if v else "-"
        idle = "-"
        if (out / "six.rss").exists():
            rows = rss_rows(out / "six.rss")
            idle = f"{sum(j - b for _, b, j in rows) / clients:.2f}"
        after = sum(r["rss_kib_per_connection"] * r["clients"] for r in rs
                    if r["rss_kib_per_connection"] is not None) / clients
        publisher = next((r for r in rs if r["publish_calls"] > 0), rs[0])
        print(f"{len(rs)} replicas sharing CPU 0 with Redis, {len(rs)} load generators on CPU 1; one channel; "
              "CPU summed over the replicas; p50/p99 as the range over the load generators.\n")
        print("| connections | msgs/s | deliveries/s | gateway CPU µs/delivery | p50 ms | p99 ms "
              "| RSS KiB/conn joined, idle | RSS KiB/conn after | exact | load avg (1 min) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        exact = all(r["exact"] for r in rs) and delivered == sum(r["expected_total"] for r in rs)
        print(f"| {clients:,} | {publisher['rate']:.2f} | {delivered / elapsed:,.0f} | "
              f"{cpu / delivered * 1e6 if delivered else float('nan'):.2f} | {rng(p50)} | {rng(p99)} | {idle} | "
              f"{after:.2f} | {'yes' if exact else 'NO'} | {load(out / 'six.load')} |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bench/growth_report.py RESULTS_DIR")
    main(sys.argv[1])
