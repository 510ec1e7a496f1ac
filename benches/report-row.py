#!/usr/bin/env python3
"""Turns one `replog benchmark --json` report (stdin) into a Markdown row."""
import json
import sys

system, clients = sys.argv[1], sys.argv[2]
d = json.load(sys.stdin)[0]
print(
    f"| {system} | {clients} | {d['count']} | {d['ops_per_sec']:,.0f} "
    f"| {d['p50_us'] / 1000:.2f} ms | {d['p99_us'] / 1000:.2f} ms |"
)
