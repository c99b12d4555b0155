#!/usr/bin/env python3
"""Reads thynapse-bench JSON lines and prints one Markdown table of medians
with Thynapse/NATS ratios (bench/compare.sh calls it; run it by hand on a
saved results file too)."""

import json
import statistics
import sys
from collections import defaultdict

SCENARIOS = [
    ("1a", "anycatch_noack", "anycatch, ack: false vs NATS queue group (msgs/s)"),
    ("1b", "anycatch_ack", "anycatch, acked vs JetStream work queue, explicit acks (msgs/s)"),
    ("2", "multicatch", "multicatch to 4 cells vs 4 subscribers (deliveries/s)"),
]
MESH = [
    ("5a", "mesh_anycatch_noack", "mesh of 3, publisher and cells on different nodes: anycatch, ack: false vs queue group"),
    ("5b", "mesh_anycatch_ack", "mesh of 3: anycatch acked (NATS: not run, JetStream needs a clustered setup)"),
    ("5c", "mesh_multicatch", "mesh of 3: multicatch vs 4 subscribers (deliveries/s)"),
]
THYNAPSE = ["thynapse-sdk", "thynapse-raw"]


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def fmt_rate(x):
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    return f"{x / 1e3:.0f} k"


def main():
    rows = load(sys.argv[1])
    groups = defaultdict(list)
    for r in rows:
        groups[(r["system"], r["scenario"], r.get("payload", 0))].append(r)

    def med(system, scenario, payload, key="msgs_per_sec"):
        g = groups.get((system, scenario, payload))
        if not g:
            return None, 0, 0, 0
        vals = [r[key] for r in g if r.get(key) is not None]
        lost = sum(r.get("lost", 0) for r in g)
        dup = sum(r.get("dup", 0) for r in g)
        return (statistics.median(vals) if vals else None), len(g), lost, dup

    systems = [s for s in THYNAPSE if any(k[0] == s for k in groups)]
    payloads = sorted({k[2] for k in groups if k[1] in {s for _, s, _ in SCENARIOS + MESH}})

    def cpu_us(system, scenario, payload):
        """Median server CPU microseconds per published event."""
        g = groups.get((system, scenario, payload)) or []
        vals = [r["server_cpu_secs"] * 1e6 / r["msgs"] for r in g
                if r.get("server_cpu_secs") is not None and r.get("msgs")]
        return f"{statistics.median(vals):.1f}" if vals else "-"

    print("| # | scenario | payload | NATS | " + " | ".join(
        f"{s} | {s}/NATS" for s in systems) + " | lost/dup (NATS; " + "; ".join(systems)
        + ") | server CPU µs/event (NATS; " + "; ".join(systems) + ") | runs |")
    print("|---|---|---|---|" + "---|---|" * len(systems) + "---|---|---|")

    def rows_for(scenarios):
        for num, scen, desc in scenarios:
            for p in payloads:
                n, nruns, nl, nd = med("nats", scen, p)
                cells = []
                losses = [f"{nl}/{nd}"]
                runs = [nruns]
                for s in systems:
                    t, truns, tl, td = med(s, scen, p)
                    ratio = f"**{t / n:.2f}**" if (t and n) else "-"
                    cells.append(f"{fmt_rate(t)} | {ratio}")
                    losses.append(f"{tl}/{td}")
                    runs.append(truns)
                if n is None and all(c.startswith("-") for c in cells):
                    continue
                cpus = [cpu_us("nats", scen, p)] + [cpu_us(s, scen, p) for s in systems]
                print(f"| {num} | {desc} | {p} B | {fmt_rate(n)} | " + " | ".join(cells)
                      + f" | {'; '.join(losses)} | {'; '.join(cpus)} | {'/'.join(map(str, runs))} |")
    rows_for(SCENARIOS)

    # 1b's Thynapse figures against NATS without acks (1a's NATS column), as
    # the issue asks: what acks and redelivery cost next to no guarantee.
    for p in payloads:
        n, nruns, _, _ = med("nats", "anycatch_noack", p)
        cells, runs = [], [nruns]
        for s in systems:
            t, truns, _, _ = med(s, "anycatch_ack", p)
            cells.append(f"{fmt_rate(t)} | " + (f"**{t / n:.2f}**" if (t and n) else "-"))
            runs.append(truns)
        if n is None:
            continue
        print(f"| 1b' | anycatch acked vs NATS queue group without acks (msgs/s; no target) | {p} B | "
              f"{fmt_rate(n)} | " + " | ".join(cells) + f" | - | - | {'/'.join(map(str, runs))} |")

    # Request/reply, keyed by the number of requesters and of responders.
    rr = defaultdict(list)
    for r in rows:
        if r["scenario"] == "request_reply":
            rr[(r["system"], r.get("requesters"), r.get("cells"))].append(r)

    def rr_med(system, shape, key):
        vals = [r[key] for r in rr.get((system,) + shape, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def fmt_us(v):
        return f"{v:.0f} µs" if v else "-"

    rr_systems = [s for s in THYNAPSE if any(k[0] == s for k in rr)]
    if rr:
        shapes = sorted({k[1:] for k in rr}, key=lambda k: (-(k[0] or 0), -(k[1] or 0)))
        for shape in shapes:
            n, resp = shape
            label = f"request/reply, {n} requester(s), {resp} responder(s)"
            runs = "/".join(str(len(rr.get((s,) + shape, []))) for s in ["nats"] + systems)
            nt = rr_med("nats", shape, "msgs_per_sec")
            cells = []
            for s in systems:
                t = rr_med(s, shape, "msgs_per_sec") if s in rr_systems else None
                ratio = f"**{t / nt:.2f}**" if (t and nt) else "-"
                cells.append(f"{fmt_rate(t) if t else 'not in this client yet'} | {ratio}")
            losses = "; ".join(
                f"{sum(r.get('lost', 0) for r in rr.get((s,) + shape, []))}/"
                f"{sum(r.get('dup', 0) for r in rr.get((s,) + shape, []))}" for s in ["nats"] + systems)
            print(f"| 4 | {label} (replies/s) | 128 B | {fmt_rate(nt)} | "
                  + " | ".join(cells) + f" | {losses} | - | {runs} |")
            for key, what in (("p50_us", "p50 latency (lower is better)"),
                              ("p99_us", "p99 latency (lower is better; no target)")):
                nv = rr_med("nats", shape, key)
                cells = []
                for s in systems:
                    t = rr_med(s, shape, key) if s in rr_systems else None
                    ratio = f"**{t / nv:.2f}**" if (t and nv) else "-"
                    cells.append(f"{fmt_us(t)} | {ratio}")
                print(f"| 4 | {label}, {what} | 128 B | {fmt_us(nv)} | "
                      + " | ".join(cells) + f" | - | - | {runs} |")
    else:
        print("| 4 | request/reply | - | not run | " + " | ".join(
            "not run | -" for _ in systems) + " | - | - | 0 |")
    rows_for(MESH)
    if not any(k[1].startswith("mesh_") for k in groups):
        print("| 5 | three-transmitter mesh | - | not run | " + " | ".join(
            "not measured | -" for _ in systems) + " | - | - | 0 |")

    # Memory.
    mem_sys = {k[0] for k in groups if k[1] == "memory"}
    if mem_sys:
        print()
        print("| 6 | memory | idle RSS | RSS with cells | per cell | ratio per cell / NATS | runs |")
        print("|---|---|---|---|---|---|---|")
        nats_pc, _, _, _ = med("nats", "memory", 0, "per_cell_bytes")
        for s in ["nats"] + [x for x in sorted(mem_sys) if x != "nats"]:
            for note in sorted({r.get("note", "") for r in groups.get((s, "memory", 0), [])}):
                g = [r for r in groups[(s, "memory", 0)] if r.get("note", "") == note]
                idle = statistics.median(r["rss_idle_kib"] for r in g)
                loaded = statistics.median(r["rss_loaded_kib"] for r in g)
                pc = statistics.median(r["per_cell_bytes"] for r in g)
                cells = g[0]["cells"]
                ratio = f"**{pc / nats_pc:.2f}**" if (nats_pc and s != "nats") else "-"
                label = s + (f" ({note})" if note else "")
                print(f"| 6 | {label}, {cells} idle | {idle / 1024:.1f} MiB | {loaded / 1024:.1f} MiB "
                      f"| {pc / 1024:.1f} KiB | {ratio} | {len(g)} |")

    z = groups.get(("zmq", "dealer_router", 128))
    if z:
        v = statistics.median(r["msgs_per_sec"] for r in z)
        print()
        print(f"Raw libzmq DEALER->ROUTER, 128 B, median of {len(z)}: {fmt_rate(v)} msgs/s")


if __name__ == "__main__":
    main()
