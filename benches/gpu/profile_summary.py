#!/usr/bin/env python3
"""Summarises a CubeCL `basic` profiling log (one `| duration | kernel name ...` line per
launch): the launches of the last decode step, grouped by kernel, largest total first. The
step is found as the period of the launch sequence after the last random-weight kernel (the
decode steps repeat it exactly).

    python3 profile_summary.py profile.log          # the last decode step
    python3 profile_summary.py profile.log --all    # every launch after the weights (prefill)
    python3 profile_summary.py profile.log --all --last-run    # the last of repeated runs (--repeat 3)
"""
import collections
import re
import sys


def micros(text):
    m = re.match(r"([\d.]+)(ms|µs|ns|s)", text.strip())
    return float(m.group(1)) * {"ms": 1e3, "µs": 1, "ns": 1e-3, "s": 1e6}[m.group(2)] if m else None


def launches(path):
    for line in open(path, encoding="utf-8", errors="replace"):
        parts = [p.strip() for p in line.split("|") if p.strip()]
        if len(parts) < 2 or micros(parts[0]) is None:
            continue
        name = parts[1]
        if "Matmul" in line:
            name = "Matmul " + ("fused " if "FusedMatmulArgs" in line else "") + parts[-1][-8:]
        elif len(parts) > 2:
            name = parts[1] + " " + parts[-1][-8:]
        yield micros(parts[0]), name


def summarise(title, launched, top=20):
    total, count = collections.Counter(), collections.Counter()
    for t, n in launched:
        total[n] += t
        count[n] += 1
    print(f"{title}: {len(launched)} launches, {sum(total.values()) / 1e3:.2f} ms (profiled, each launch synchronised)")
    for n, t in total.most_common(top):
        print(f"{t / 1e3:9.3f} ms {count[n]:5d} x {t / count[n]:8.1f} us  {n}")


def main(path, everything=False, probe=200, last_run=False):
    rows = list(launches(path))
    start = max((i for i, (_, n) in enumerate(rows) if "Prng" in n), default=-1) + 1
    if everything:
        after = rows[start:]
        if last_run:
            # The longest tail that repeats just before itself: the last run (the first run
            # is longer, with the autotuner's trial launches).
            names = [n for _, n in after]
            period = next((p for p in range(len(names) // 2, 0, -1) if names[-p:] == names[-2 * p:-p]), None)
            if period is None:
                print("no repeated run in the log")
                return
            summarise("the last run", after[-period:], top=30)
        else:
            summarise("every launch after the weights", after, top=30)
        return
    names = [n for _, n in rows[start:]]
    tail = names[-probe:]
    period = next((p for p in range(probe, len(names) - probe) if names[-probe - p:-p] == tail), None)
    if period is None:
        print("no repeating decode step in the log")
        return
    summarise("last decode step", rows[-period:])


if __name__ == "__main__":
    main(sys.argv[1], everything="--all" in sys.argv[2:], last_run="--last-run" in sys.argv[2:])
