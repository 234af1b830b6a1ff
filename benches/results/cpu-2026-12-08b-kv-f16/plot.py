#!/usr/bin/env python3
"""Plot runs.jsonl (SmolLM2, after 32, 600 and 2,000 prompt tokens) and runs-qwen3-small.jsonl
(after 2,000; the final value loop's rounds) of cpu-2026-12-08b-kv-f16: decode tok/s before (58d707b, f32 pages), after
with f32 pages and with f16 pages, and llama.cpp (f16 cache), each round a point, the median a bar.

    python3 benches/results/cpu-2026-12-08b-kv-f16/plot.py  (writes ../cpu-2026-12-08b-kv-f16.png)
"""
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = os.path.dirname(os.path.abspath(__file__))
panels = [("SmolLM2-135M Q4_1 (3 key heads)", "runs.jsonl"), ("small Qwen3 Q4_1-pure (4 key heads)", "runs-qwen3-small.jsonl")]
panels = [(t, [json.loads(l) for l in open(os.path.join(here, f))]) for t, f in panels if os.path.exists(os.path.join(here, f))]
# The small Qwen3's first three rounds ran an earlier value loop (channels outermost): left out.
panels = [(t, [r for r in rows if r.get("values") != "channels-outer"]) for t, rows in panels]
series = [("before (58d707b), f32 pages", lambda r: r.get("build") == "before", "#999999"),
          ("after, f32 pages (default)", lambda r: r.get("build") == "after" and r["kv"] == "f32", "#1f77b4"),
          ('after, kv_cache_dtype = "f16"', lambda r: r.get("build") == "after" and r["kv"] == "f16", "#2ca02c"),
          ("llama.cpp tg128 -d DEPTH (f16 cache)", lambda r: r["engine"] == "llama.cpp", "#d62728")]
fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
width = 0.2
for ax, (title, rows) in zip(axes[0], panels):
    depths = sorted({r["depth"] for r in rows})
    for s, (label, pick, color) in enumerate(series):
        for c, depth in enumerate(depths):
            vals = [r["tok_s"] for r in rows if r["depth"] == depth and pick(r)]
            if not vals:
                continue
            x = c + (s - 1.5) * width
            ax.bar(x, statistics.median(vals), width, color=color, label=label if c == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(depths)))
    ax.set_xticklabels([f"after {d} prompt tokens" for d in depths])
    ax.set_ylabel("decode tokens/s (2 threads)")
    ax.set_title(f"{title}, 2-core AMD EPYC VM, 2026-12-08", fontsize=10)
axes[0][0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(here, "..", "cpu-2026-12-08b-kv-f16.png"), dpi=110)
