#!/usr/bin/env python3
"""Plot of a Qwen3-VL device call (benches/gpu/run_vl_2b.sh results.json): time to first token
of a one-image prompt at 448x448 and 1344x1344 and decode tokens/s after it, ours beside
transformers eager in the same call.

    python3 plot_vl.py RESULTS.json OUT.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

r = json.load(open(sys.argv[1]))
sides = ["448", "1344"]
peer = r["peer_transformers"]
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
x = range(len(sides))


def pair(ax, ours, theirs, ours_label):
    """Ours beside transformers at each image size, each bar labelled with its value."""
    ax.bar([i - 0.2 for i in x], ours, 0.4, label=ours_label, color="#4a7")
    ax.bar([i + 0.2 for i in x], theirs, 0.4, label="transformers eager", color="#999")
    for i, (o, t) in enumerate(zip(ours, theirs)):
        ax.text(i - 0.2, o, f"{o:.0f}", ha="center", va="bottom")
        ax.text(i + 0.2, t, f"{t:.0f}", ha="center", va="bottom")


pair(a, [r[f"ours{s}"]["ttft_s"] * 1e3 for s in sides], [peer[s]["ttft_s"] * 1e3 for s in sides], "inference-pio")
a.bar([i + 0.2 for i in x], [peer[s]["vision_s"] * 1e3 for s in sides], 0.4, label="of which its vision tower", color="#777", hatch="//", fill=False)
a.set_xticks(list(x), [f"{s}x{s} ({peer[s]['image_tokens']} image tokens)" for s in sides])
a.set_ylabel("time to first token, ms (warm)")
a.set_title("One-image prompt: time to first token")
a.legend()
pair(b, [r[f"ours{s}"]["steady_decode_tokens_per_s"] for s in sides], [peer[s]["decode_tokens_per_s"] for s in sides], "inference-pio (steady)")
b.set_xticks(list(x), [f"after {s}x{s}" for s in sides])
b.set_ylabel("decode tokens/s, batch 1")
b.set_title("Decode after the image")
b.legend()
device = r.get("device", "NVIDIA H200").split(",")[0].replace("NVIDIA ", "")
fig.suptitle(f"Qwen3-VL-2B config, random bf16 weights, {device}; commit {r['commit']}, {os.environ.get('PLOT_DATE', '')}", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print("wrote", sys.argv[2])
