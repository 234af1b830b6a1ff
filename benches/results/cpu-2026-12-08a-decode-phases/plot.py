#!/usr/bin/env python3
"""Plot runs.jsonl (SmolLM2, after 32, 600 and 2,000 prompt tokens) and runs-qwen3-small.jsonl
(after 300 and 2,000) of cpu-2026-12-08a-decode-phases: decode tok/s, ours with the three-phase
decode attention and with the one-region tasks, and llama.cpp, each round a point, the median a bar.

    python3 benches/results/cpu-2026-12-08a-decode-phases/plot.py  (writes ../cpu-2026-12-08a-decode-phases.png)
"""
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = os.path.dirname(os.path.abspath(__file__))
panels = [("SmolLM2-135M Q4_1 (3 key heads)", [json.loads(l) for l in open(os.path.join(here, "runs.jsonl"))]),
          ("small Qwen3 Q4_1-pure (4 key heads)", [json.loads(l) for l in open(os.path.join(here, "runs-qwen3-small.jsonl"))])]
series = [("ours, one-region tasks (INFERENCE_PIO_CPU_DECODE_PHASES=0)", lambda r: r["engine"] == "inference-pio" and r["attention"] != "phases", "#999999"),
          ("ours, three phases (default)", lambda r: r["engine"] == "inference-pio" and r["attention"] == "phases", "#1f77b4"),
          ("llama.cpp tg128 -d DEPTH", lambda r: r["engine"] == "llama.cpp", "#d62728")]
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
width = 0.26
for ax, (title, rows) in zip(axes, panels):
    depths = sorted({r["depth"] for r in rows})
    for s, (label, pick, color) in enumerate(series):
        for c, depth in enumerate(depths):
            vals = [r["tok_s"] for r in rows if r["depth"] == depth and pick(r)]
            x = c + (s - 1) * width
            ax.bar(x, statistics.median(vals), width, color=color, label=label if c == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(depths)))
    ax.set_xticklabels([f"after {d} prompt tokens" for d in depths])
    ax.set_ylabel("decode tokens/s (2 threads)")
    ax.set_title(f"{title}, 2-core AMD EPYC VM, 2026-12-08", fontsize=10)
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(here, "..", "cpu-2026-12-08a-decode-phases.png"), dpi=110)
