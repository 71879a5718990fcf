#!/usr/bin/env python3
"""Markdown table of docs/measurements.jsonl (last run of each name wins)."""
import json, sys
path = sys.argv[1] if len(sys.argv) > 1 else "docs/measurements.jsonl"
rows = {}
for line in open(path):
    r = json.loads(line)
    rows[r["name"]] = r
print("| run | params | MACs | top-1 | top-5 | optimize |")
print("|---|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    print(f"| {name} | {r['params']:,} ({100*r['params_share']:.1f} %) | {100*r['macs_share']:.1f} % | {r['top1']:.3f} | {r['top5']:.3f} | {r['optimize_s']:.1f} s |")
