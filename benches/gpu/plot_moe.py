#!/usr/bin/env python3
"""Merges one `run_moe_bench.sh` device call (its $OUT copied to RUN_DIR) into RUN_DIR.json and
RUN_DIR.png: inference-pio and transformers eager, Qwen3-Coder-30B-A3B shapes, random bf16
weights, batch 1, same GPU, same call.

    python3 benches/gpu/plot_moe.py RUN_DIR COMMIT DATE COMMAND
"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

run, commit, date, command = sys.argv[1:5]
p128 = json.load(open(f"{run}/pio_p128.json"))["timings"]
p2048 = json.load(open(f"{run}/pio_p2048.json"))["timings"]
peer = json.load(open(f"{run}/peer_eager.json"))
device = open(f"{run}/device.txt").read().strip()

# The last 512-token prefill chunk of the 2,048-token prompt, from the phase log: kernels are
# compiled by then, so this is the steady prefill rate (the run's own figure includes start-up).
stamps = {}
for line in open(f"{run}/pio_p2048_phases.txt"):
    m = re.match(r"\[inference-pio\s+([\d.]+) s\] (.*)", line)
    if m:
        stamps.setdefault(m.group(2), float(m.group(1)))
last = stamps["prefill done, first logits on the host"] - stamps["prefill tokens 1536..2048 of 2048"]
steady_prefill = 512 / last

rows = [
    ("decode tok/s (steady)", p128["steady_decode_tokens_per_s"], peer["decode_tokens_per_s"]),
    ("prefill tok/s, 128-token prompt", p128["prefill_tokens_per_s"], peer["prefill_128_tokens_per_s"]),
    ("prefill tok/s, 2,048 (last 512 chunk / peer whole)", steady_prefill, peer["prefill_2048_tokens_per_s"]),
    ("time to first token, 128 (s)", p128["time_to_first_token_s"], peer["time_to_first_token_s"]),
]
result = {
    "benchmark": "Qwen3-Coder-30B-A3B shapes (real config.json), random bf16 weights, batch 1",
    "device": device, "date": date, "commit": commit, "command": command,
    "notes": "inference-pio: one process per prompt, started cold (kernels compiled on first use, "
             "no autotune); its time to first token includes generating the 61 GB of weights and "
             "compiling kernels. transformers: warm (a warm-up pass first), eager, sdpa.",
    "inference_pio": {"p128": p128, "p2048": p2048, "prefill_2048_last_chunk_tokens_per_s": steady_prefill},
    "transformers": peer,
    "table": [{"metric": m, "inference_pio": a, "transformers": b} for m, a, b in rows],
}
json.dump(result, open(f"{run}.json", "w"), indent=1)
fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6))
for ax, (metric, a, b) in zip(axes, rows):
    ax.bar(["inference-pio", "transformers\neager"], [a, b], color=["#1f77b4", "#ff7f0e"])
    ax.set_title(metric, fontsize=9)
    for i, v in enumerate([a, b]):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
fig.suptitle(f"{result['benchmark']} — {device} — {date} @ {commit}", fontsize=9)
fig.tight_layout()
fig.savefig(f"{run}.png", dpi=100)
for m, a, b in rows:
    print(f"{m:52s} inference-pio {a:10.3f}   transformers {b:10.3f}")
