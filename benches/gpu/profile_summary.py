#!/usr/bin/env python3
"""Summarises a CubeCL `basic` profiling log (one `| duration | kernel name ...` line per
launch): the launches of the last forward pass (segments end at the f32 cast of the logits),
grouped by kernel, largest total first.

    python3 profile_summary.py profile.log
"""
import collections
import re
import sys


def micros(text):
    m = re.match(r"([\d.]+)(ms|µs|ns|s)", text.strip())
    return float(m.group(1)) * {"ms": 1e3, "µs": 1, "ns": 1e-3, "s": 1e6}[m.group(2)] if m else None


def main(path):
    steps, cur = [], []
    for line in open(path, encoding="utf-8", errors="replace"):
        parts = [p.strip() for p in line.split("|") if p.strip()]
        if len(parts) < 2 or micros(parts[0]) is None:
            continue
        name = parts[1]
        if "Matmul" in line:
            name = "Matmul " + ("fused " if "FusedMatmulArgs" in line else "") + parts[-1][-8:]
        elif len(parts) > 2:
            name = parts[1] + " " + parts[-1][-8:]
        cur.append((micros(parts[0]), name))
        if parts[1].startswith("CastElement"):
            steps.append(cur)
            cur = []
    if not steps:
        print("no complete forward pass in the log")
        return
    last = steps[-1]
    total, count = collections.Counter(), collections.Counter()
    for t, n in last:
        total[n] += t
        count[n] += 1
    print(f"{len(steps)} segments; last: {len(last)} launches, {sum(total.values()) / 1e3:.2f} ms (profiled, each launch synchronised)")
    for n, t in total.most_common(30):
        print(f"{t / 1e3:9.3f} ms {count[n]:5d} x {t / count[n]:8.1f} us  {n}")


if __name__ == "__main__":
    main(sys.argv[1])
