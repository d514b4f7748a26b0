#!/usr/bin/env python3
"""Prints the median of every criterion benchmark under target/criterion,
and the ratio of each benchmark to the `empty_policy` one of its group, as
a Markdown table for BENCHMARKS.md."""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
rows = {}
for est in sorted(root.glob("*/*/new/estimates.json")):
    group, bench = est.parts[-4], est.parts[-3]
    rows.setdefault(group, {})[bench] = json.loads(est.read_text())["median"]["point_estimate"]

print("| group | benchmark | median | ÷ empty_policy |")
print("| --- | --- | ---: | ---: |")
for group, benches in rows.items():
    base = benches.get("empty_policy")
    for bench, ns in benches.items():
        if ns >= 1e6:
            shown = f"{ns / 1e6:.2f} ms"
        elif ns >= 1000:
            shown = f"{ns / 1000:.2f} µs"
        else:
            shown = f"{ns:.0f} ns"
        ratio = f"{ns / base:.2f}" if base else ""
        print(f"| {group} | {bench} | {shown} | {ratio} |")
