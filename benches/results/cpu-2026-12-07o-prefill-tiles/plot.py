#!/usr/bin/env python3
"""Plot runs.jsonl of cpu-2026-12-07o-prefill-tiles: prefill tok/s per case, ours with the tiled
attention and with the reference, and llama.cpp, each round a point, the median a bar.

    python3 benches/results/cpu-2026-12-07o-prefill-tiles/plot.py  (writes ../cpu-2026-12-07o-prefill-tiles.png)
"""
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = os.path.dirname(os.path.abspath(__file__))
rows = [json.loads(l) for l in open(os.path.join(here, "runs.jsonl"))]
cases = []
for r in rows:
    key = (r["case"], r["tokens"])
    if key not in cases:
        cases.append(key)
series = [("ours, reference attention", lambda r: r["engine"] == "inference-pio" and r["attention"] != "tiles", "#999999"),
          ("ours, tiles (default)", lambda r: r["engine"] == "inference-pio" and r["attention"] == "tiles", "#1f77b4"),
          ("llama.cpp", lambda r: r["engine"] == "llama.cpp", "#d62728")]
fig, ax = plt.subplots(figsize=(9, 4.5))
width = 0.26
for s, (label, pick, color) in enumerate(series):
    for c, key in enumerate(cases):
        vals = [r["tok_s"] for r in rows if (r["case"], r["tokens"]) == key and pick(r)]
        x = c + (s - 1) * width
        ax.bar(x, statistics.median(vals), width, color=color, label=label if c == 0 else None)
        ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
ax.set_xticks(range(len(cases)))
ax.set_xticklabels([f"{c}\n{t} tokens" for c, t in cases])
ax.set_ylabel("prefill tokens/s (2 threads)")
ax.set_title("CPU prefill, 2-core AMD EPYC VM, 2026-12-07 (c4075ce): tiled attention vs reference vs llama.cpp")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(here, "..", "cpu-2026-12-07o-prefill-tiles.png"), dpi=110)
