#!/usr/bin/env python3
"""runs.jsonl -> BASE.json (medians per engine, threads and metric, ratios to llama.cpp) and
BASE.png. Usage: summary.py RUNS BASE (BASE without extension; the folder's name)."""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = sys.argv[2]
engines = ["before", "after", "llama.cpp"]
metrics = ["decode", "prefill256"]
med = {}
for e in engines:
    for t in (1, 2):
        for m in metrics:
            v = [r[m] for r in runs if r["engine"] == e and r["threads"] == t and m in r]
            if v:
                med[f"{e}/{t}/{m}"] = statistics.median(v)
ratios = {k: med[k] / med[f"llama.cpp/{k.split('/', 1)[1]}"] for k in med if not k.startswith("llama.cpp")}
json.dump({"runs": runs, "medians": med, "ratio_to_llama_cpp": ratios}, open(base + ".json", "w"), indent=1)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.5))
for ax, (t, m) in zip(axes, [(t, m) for m in metrics for t in (1, 2)]):
    vals = [med.get(f"{e}/{t}/{m}", 0) for e in engines]
    ax.bar(engines, vals, color=["#aec7e8", "#1f77b4", "#ff7f0e"])
    ax.set_title(f"{'decode (128 new)' if m == 'decode' else 'prefill (256 tokens)'}, {t} thread{'s' if t > 1 else ''}, tok/s", fontsize=9)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
fig.suptitle("small Qwen3-MoE Q4_0, 2-core x86-64 VM (AVX-512), medians of rounds", fontsize=9)
fig.tight_layout()
fig.savefig(base + ".png", dpi=100)
for k in sorted(med):
    print(f"{k:28s} {med[k]:9.1f}" + (f"   {ratios[k]:.2f}x llama.cpp" if k in ratios else ""))
