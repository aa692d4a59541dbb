#!/usr/bin/env python3
"""The tables of a bench/compression.sh run, from its JSON reports, with ratios within the run.

    python3 bench/compression_report.py DIR
"""
import json
import os
import sys

CONFIGS = ["wsbridge-off", "wsbridge-on", "socketio-off", "socketio-on"]
LABEL = {
    "wsbridge-off": "wsbridge, compression off",
    "wsbridge-on": "wsbridge, permessage-deflate on",
    "socketio-off": "socket.io, perMessageDeflate off",
    "socketio-on": "socket.io, perMessageDeflate on (threshold 256)",
}


def load(d, name):
    p = os.path.join(d, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None


def num(x, fmt="{:,.2f}"):
    return "–" if x is None else fmt.format(x)


def ratio(x, base):
    return "–" if x is None or not base else f"{x / base:.2f}×"


def main(d):
    out = []
    w = lambda s="": out.append(s)
    machine = os.path.join(d, "machine.txt")
    if os.path.exists(machine):
        w("**Machine:** " + "; ".join(l.strip() for l in open(machine) if l.strip()))
        w()

    unavailable = {c: load(d, c + ".unavailable") for c in CONFIGS + ["wsbridge-publish-client"]}
    wire = {c: load(d, c + "-wire") for c in CONFIGS}
    if any(wire.values()):
        base = wire.get("wsbridge-off") or {}
        w("### ~1 KiB JSON message to 1,000 subscribers (2 replicas, 20 msgs/s)")
        w()
        w("| server | negotiated | delivered | frames compressed | message bytes | wire bytes per delivery | wire / message | × wsbridge off | gateway CPU µs/delivery | × wsbridge off | p50 / p99 ms |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for c in CONFIGS:
            r = wire[c]
            if unavailable[c] or not r:
                w(f"| {LABEL[c]} | to be measured ({(unavailable[c] or {}).get('why', 'not run')}) | | | | | | | | | |")
                continue
            lat = r.get("latency_ms") or {}
            w(
                f"| {LABEL[c]} | {r['negotiated']}/{r['clients']} | {r['delivered_total']:,}/{r['expected_total']:,}"
                f" | {r['compressed_frames']:,}/{r['frames_read']:,} | {num(r.get('text_bytes_per_delivery'), '{:,.0f}')}"
                f" | {num(r.get('wire_bytes_per_delivery'), '{:,.0f}')} | {num(r.get('wire_over_text'))}"
                f" | {ratio(r.get('wire_bytes_per_delivery'), base.get('wire_bytes_per_delivery'))}"
                f" | {num(r.get('gateway_cpu_us_per_delivery'))} | {ratio(r.get('gateway_cpu_us_per_delivery'), base.get('gateway_cpu_us_per_delivery'))}"
                f" | {num(lat.get('p50'))} / {num(lat.get('p99'))} |"
            )
        ext = [f"{c}: `{wire[c]['extensions']}`" for c in CONFIGS if wire[c] and wire[c].get("extensions")]
        if ext:
            w()
            w("Negotiated: " + "; ".join(ext))
        w()

    idle = {c: load(d, c + "-idle") for c in CONFIGS}
    if any(idle.values()):
        base = idle.get("wsbridge-off") or {}
        w("### Idle connections offering permessage-deflate (2 replicas, fresh processes)")
        w()
        w("| server | connections | negotiated | KiB/connection idle | × wsbridge off | KiB/connection after one ~1 KiB message each | × wsbridge off |")
        w("|---|---|---|---|---|---|---|")
        for c in CONFIGS:
            r = idle[c]
            if unavailable[c] or not r:
                w(f"| {LABEL[c]} | to be measured ({(unavailable[c] or {}).get('why', 'not run')}) | | | | | |")
                continue
            a, b = r.get("rss_kib_per_connection_idle"), r.get("rss_kib_per_connection_after_one_message")
            w(
                f"| {LABEL[c]} | {r['clients']:,} | {r['negotiated']:,} | {num(a)} | {ratio(a, base.get('rss_kib_per_connection_idle'))}"
                f" | {num(b)} | {ratio(b, base.get('rss_kib_per_connection_after_one_message'))} |"
            )
        w()

    pub = {v: load(d, f"wsbridge-publish-{v}") for v in ["stream", "client"]}
    if any(pub.values()):
        base = pub.get("stream") or {}
        w("### A client's message to 1,000 other clients (wsbridge, 10 publishing clients, 20 msgs/s)")
        w()
        w("| path | delivered | acks | p50 ms | p99 ms | p99.9 ms | × stream p50 | CPU µs/delivery (gateways + backend) |")
        w("|---|---|---|---|---|---|---|---|")
        names = {"stream": "`send` → stream → backend (Rust example) → `POST /send`", "client": "client `publish` frame"}
        for v in ["stream", "client"]:
            r = pub[v]
            if (v == "client" and unavailable["wsbridge-publish-client"]) or not r:
                why = (unavailable["wsbridge-publish-client"] or {}).get("why", "not run")
                w(f"| {names[v]} | to be measured ({why}) | | | | | | |")
                continue
            lat = r.get("latency_ms") or {}
            w(
                f"| {names[v]} | {r['delivered_total']:,}/{r['expected_total']:,} | {r.get('acks', 0):,} | {num(lat.get('p50'))} | {num(lat.get('p99'))}"
                f" | {num(lat.get('p999'))} | {ratio(lat.get('p50'), (base.get('latency_ms') or {}).get('p50'))} | {num(r.get('gateway_cpu_us_per_delivery'))} |"
            )
        w()
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
