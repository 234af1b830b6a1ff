#!/usr/bin/env python3
"""Plots benches/results/gpu-h200-2026-12-01-graphs.json: batch-1 steady decode, tok/s, of
inference-pio (eager step, captured step with each form of the one-row linears) and
transformers (eager, static cache + compile) on Qwen3-4B and Qwen3-Coder-30B-A3B shapes.

    python3 benches/gpu/plot_graphs.py benches/results/gpu-h200-2026-12-01-graphs.json
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

path = sys.argv[1]
record = json.load(open(path))
models = list(record["decode_tokens_per_s"].keys())
fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.8))
for ax, model in zip(axes, models):
    rows = record["decode_tokens_per_s"][model]
    labels = [r["what"] for r in rows]
    values = [r["tok_s"] for r in rows]
    colors = ["#4c72b0" if r["who"] == "inference-pio" else "#dd8452" for r in rows]
    bars = ax.barh(labels, values, color=colors)
    for b, v in zip(bars, values):
        ax.text(v, b.get_y() + b.get_height() / 2, f" {v:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"{model}: batch-1 decode, tok/s")
    ax.set_xlabel("tokens/s (blue: inference-pio, orange: transformers)")
    ax.tick_params(axis="y", labelsize=8)
fig.suptitle(f"{record['device']}, {record['date']}, commit {record['commit']}", fontsize=9)
fig.tight_layout()
out = path.rsplit(".", 1)[0] + ".png"
fig.savefig(out, dpi=110)
print(out)
