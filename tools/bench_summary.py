#!/usr/bin/env python3
"""Medians and spread of the device benchmarks (tools/gpu_bench.sh, tools/serve_bench.sh).

Reads JSON lines, one measurement each: {"figure": NAME, "value": X}, and prints one row per
figure in the order first seen: median, min-max and the runs."""
import json
import statistics
import sys

rows = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        d = json.loads(line)
        rows.setdefault(d["figure"], []).append(d["value"])
width = max((len(k) for k in rows), default=10)
print(f"{'figure':<{width}} | median | spread (min-max) | runs")
for k, v in rows.items():
    print(f"{k:<{width}} | {statistics.median(v):,.1f} | {min(v):,.1f}-{max(v):,.1f} | {len(v)}")
