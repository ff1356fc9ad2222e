#!/usr/bin/env python3
"""Latency percentiles of CreateRoom+DestroyRoom against offered load, plotted.

Starts a fresh `roomsched serve` (memory store, simulated backend, logs at ROOMSCHED_LOG or
its default) on a free port, measures the closed-loop peak of the create-destroy workload,
then runs the open-loop workload at 10 %, 20 %, ... 100 % of that peak and records
p50/p90/p99/p99.9 (latency counted from when each request was due). At each rate it also runs
grpc.health.v1.Health/Check, open loop, at the same rate: its p99 is what the transport and
this machine's scheduling give a call that does no work. Writes docs/latency_vs_load.csv and
docs/latency_vs_load.svg.

    python3 scripts/latency_vs_load.py [--bin target/release/roomsched] [--seconds 5]

Needs matplotlib (pip install matplotlib).
"""
import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(binary, addr, *args):
    out = subprocess.run(
        [binary, "bench", "--addr", addr, "--json", *args],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "roomsched"))
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args()
    addr = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([a.bin, "serve", "--listen", addr, "--store", "memory"],
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        duration = f"{a.seconds}s"
        peak = bench(a.bin, addr, "--workload", "create-destroy", "--duration", duration,
                     "--concurrency", "32")["requests_per_second"]
        print(f"closed-loop peak: {peak:.0f} requests/s", file=sys.stderr)
        rows = []
        for pct in range(10, 101, 10):
            rate = peak * pct / 100
            r = bench(a.bin, addr, "--workload", "create-destroy", "--duration", duration,
                      "--rate", f"{rate:.0f}", "--concurrency", str(a.concurrency))
            lat = r["latency_ms"]
            health = bench(a.bin, addr, "--workload", "health", "--duration", duration,
                           "--rate", f"{rate:.0f}", "--concurrency", str(a.concurrency))
            rows.append({"percent_of_peak": pct, "offered_rps": round(rate),
                         "achieved_rps": round(r["requests_per_second"]),
                         "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                         "p99_ms": lat["p99"], "p999_ms": lat["p999"],
                         "health_p99_ms": health["latency_ms"]["p99"]})
            print(rows[-1], file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    csv_path = os.path.join(ROOT, "docs", "latency_vs_load.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    x = [r["offered_rps"] for r in rows]
    for key, label in [("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]:
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.plot(x, [r["health_p99_ms"] for r in rows], color="black", linestyle="--", marker="x",
            label="p99 of Health/Check at the same rate")
    ax.axhline(2.0, color="grey", linestyle="--", linewidth=1, label="p99 target (2 ms)")
    ax.axvline(peak / 2, color="grey", linestyle=":", linewidth=1, label="half of peak")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, requests/s (CreateRoom and DestroyRoom, open loop)")
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_title(f"roomsched over gRPC on 2 cores: latency vs load (peak {peak:.0f} req/s)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    svg_path = os.path.join(ROOT, "docs", "latency_vs_load.svg")
    fig.savefig(svg_path)
    fig.savefig(svg_path.replace(".svg", ".png"), dpi=80)
    print(f"wrote {csv_path} and {svg_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
