#!/usr/bin/env python3
"""Plot runs.jsonl of cpu-2026-12-07p-moe-host-prompts (ours now, ours before, llama.cpp per case;
each round a point, the median a bar) -> ../cpu-2026-12-07p-moe-host-prompts.png."""
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = os.path.dirname(os.path.abspath(__file__))
rows = [json.loads(l) for l in open(os.path.join(here, "runs.jsonl"))]
cases = list(dict.fromkeys(r["case"] for r in rows))
series = [("ours before (experts through tensors)", lambda r: r.get("build") == "before", "#999999"),
          ("ours now (experts on host vectors)", lambda r: r.get("build") == "now", "#1f77b4"),
          ("llama.cpp", lambda r: r["engine"] == "llama.cpp", "#d62728")]
fig, ax = plt.subplots(figsize=(8, 4.5))
width = 0.26
for s, (label, pick, color) in enumerate(series):
    for c, case in enumerate(cases):
        vals = [r["tok_s"] for r in rows if r["case"] == case and pick(r)]
        x = c + (s - 1) * width
        ax.bar(x, statistics.median(vals), width, color=color, label=label if c == 0 else None)
        ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
ax.set_xticks(range(len(cases)))
ax.set_xticklabels(["prefill, 256 tokens", "prefill, 2,048 tokens", "decode, 32 + 256"][: len(cases)])
ax.set_ylabel("tokens/s (2 threads)")
ax.set_title("Small Qwen3-MoE Q4_0 on the 2-core AMD EPYC VM, 2026-12-07")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(here, "..", "cpu-2026-12-07p-moe-host-prompts.png"), dpi=110)
