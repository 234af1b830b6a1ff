#!/usr/bin/env python3
"""Nsight Compute's per-kernel times (`ncu --csv --metrics gpu__time_duration.sum`) of an
engine run, split into engine steps (each step ends with the device argmax), summarised per
kernel for the last step in which every one of ROWS rows decodes (no prefill softmax, the
paged decode kernel's grid spanning ROWS rows) and for the last step with prefill work.

usage: ncu_steps.py NCU_CSV ROWS
"""
import csv
import re
import sys
from collections import OrderedDict

UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def launches(path):
    lines = [l for l in open(path, errors="replace") if l.startswith('"')]
    out = []
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        us = float(row["Metric Value"].replace(",", "")) * UNITS.get(row["Metric Unit"], 1.0)
        out.append((row["Kernel Name"], row.get("Grid Size", ""), us))
    return out


def named(name, what):
    """Whether kernel `name` is `what` (CamelCase or snake_case, any case)."""
    return what in name.replace("_", "").lower()


def steps(kernels):
    out, cur = [], []
    for k in kernels:
        cur.append(k)
        if named(k[0], "argmax"):
            out.append(cur)
            cur = []
    return out


def short(name):
    name = re.sub(r"\(.*$", "", name)
    return name[:70]


def summary(title, step):
    total = sum(k[2] for k in step)
    print(f"\n{title}: {len(step)} launches, {total / 1000:.3f} ms of kernel time")
    by = OrderedDict()
    for name, grid, us in step:
        key = (short(name), grid)
        n, t = by.get(key, (0, 0.0))
        by[key] = (n + 1, t + us)
    for (name, grid), (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"  {t / 1000:8.3f} ms {100 * t / total:5.1f} %  {n:4d} x {t / n:8.1f} us  {name}  grid {grid}")


def main():
    path, rows = sys.argv[1], int(sys.argv[2])
    ks = launches(path)
    st = steps(ks)
    print(f"{len(ks)} kernels, {len(st)} steps (each ending in the argmax)")
    decode_grid = re.compile(r"\(\s*\d+,\s*" + str(rows) + r",")
    full, prefill = None, None
    for i, s in enumerate(st):
        names = [k[0] for k in s]
        has_prefill = any(named(n, "softmax") for n in names)
        rows_all = any(named(n, "pageddecode") and decode_grid.search(g) for n, g, _ in s)
        total = sum(k[2] for k in s) / 1000
        print(f"  step {i:3d}: {len(s):5d} launches {total:9.3f} ms  {'prefill ' if has_prefill else ''}{'all-rows-decode' if rows_all else ''}")
        if has_prefill:
            prefill = (i, s)
        elif rows_all:
            full = (i, s)
    if full:
        summary(f"step {full[0]}: every one of {rows} rows decodes", full[1])
    else:
        print(f"\nno step with all {rows} rows decoding")
    if prefill:
        summary(f"step {prefill[0]}: the last step with prefill work", prefill[1])


if __name__ == "__main__":
    main()
