#!/usr/bin/env python3
"""Merges a pio-bench result and a peer result into BASE.json and draws BASE.png.
Usage: plot_results.py PIO_JSON PEER_JSON BASE COMMAND"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

pio = json.load(open(sys.argv[1]))
peer = json.load(open(sys.argv[2]))
base, command = sys.argv[3], sys.argv[4]
rows = [
    ("prefill tok/s", pio["median_prefill_tokens_per_s"], peer["prefill_tokens_per_s"]),
    ("decode tok/s", pio["median_decode_tokens_per_s"], peer["decode_tokens_per_s"]),
    ("time to first token (s)", pio["median_time_to_first_token_s"], peer["time_to_first_token_s"]),
    ("peak RSS (MiB)", pio["peak_rss_mib"], peer["peak_rss_mib"]),
]
result = {
    "benchmark": __import__("os").environ.get("BENCH_NAME", "qwen3-small random weights, batch 1, f32"),
    "date": pio["date"], "commit": pio["commit"], "command": command, "machine": pio["machine"],
    "device": pio["device"], "prompt_tokens": pio["prompt_tokens"], "new_tokens": pio["new_tokens"],
    "inference_pio": pio, "transformers": peer,
    "table": [{"metric": m, "inference_pio": a, "transformers": b} for m, a, b in rows],
}
json.dump(result, open(base + ".json", "w"), indent=1)
fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5))
for ax, (metric, a, b) in zip(axes, rows):
    ax.bar(["inference-pio", "transformers"], [a, b], color=["#1f77b4", "#ff7f0e"])
    ax.set_title(metric)
    for i, v in enumerate([a, b]):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
fig.suptitle(f"{result['benchmark']} — {pio['machine']} — {pio['date']} @ {pio['commit']}", fontsize=9)
fig.tight_layout()
fig.savefig(base + ".png", dpi=100)
for m, a, b in rows:
    print(f"{m:28s} inference-pio {a:10.3f}   transformers {b:10.3f}")
