#!/usr/bin/env python3
"""Sums up `replog benchmark --json` reports as Markdown rows.

Usage: report-row.py FILE
FILE holds one line per run: `system<TAB>clients<TAB>{json report}`. Prints,
per (system, clients), the median over the runs of ops/s, p50 and p99 (each
median taken on its own), plus the range of ops/s, so that one noisy run on
a shared machine does not decide a comparison, and the longest stretch
without a completed operation in any run (a disk stall or an election shows
there).
"""
import json
import statistics
import sys

runs = {}
order = []
with open(sys.argv[1]) as f:
    for line in f:
        if not line.strip():
            continue
        system, clients, report = line.rstrip("\n").split("\t", 2)
        d = json.loads(report)[0]
        key = (system, int(clients))
        if key not in runs:
            runs[key] = []
            order.append(key)
        runs[key].append(d)

order.sort(key=lambda k: (k[1], k[0] != "replog"))
print("| system | clients | runs | ops per run | ops/s (median) | ops/s (min-max) | p50 (median) | p99 (median) | longest gap (max) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for system, clients in order:
    ds = runs[(system, clients)]
    ops = [d["ops_per_sec"] for d in ds]
    p50 = statistics.median(d["p50_us"] for d in ds) / 1000
    p99 = statistics.median(d["p99_us"] for d in ds) / 1000
    gaps = [d["longest_gap_us"] for d in ds if "longest_gap_us" in d]
    gap = f"{max(gaps) / 1000:.0f} ms" if gaps else "-"
    print(
        f"| {system} | {clients} | {len(ds)} | {ds[0]['count']} "
        f"| {statistics.median(ops):,.0f} | {min(ops):,.0f}-{max(ops):,.0f} "
        f"| {p50:.2f} ms | {p99:.2f} ms | {gap} |"
    )
