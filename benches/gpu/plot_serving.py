#!/usr/bin/env python3
"""Plot of the serving calls (benches/gpu/run_serving_4b.sh results): offline output
throughput of ours per call beside transformers' continuous batching and llama.cpp's
batched-bench (same checkpoint, same lease), and the shared-prefix workload's mean time
to first token with prefix caching on and off.

    python3 plot_serving.py RESULTS_DIR OUT.png [LABEL=FILE ...]

Without LABEL=FILE pairs it plots the calls of 2026-12-02 (`gpu-h200-2026-12-02-serving/`).
The peers come from the first file that has them, or from PEERS_FROM=FILE (not plotted as a
call of ours); TRANSFORMERS_LABEL and LLAMA_LABEL name their bars; PLOT_DATE and PLOT_DEVICE
the title's date and device (default 2026-12-02, H200).
"""
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = sys.argv[1]
calls = [tuple(a.split("=", 1)) for a in sys.argv[3:]] or [
    ("call 2: gather attention", "results-call2.json"), ("call 3: + paged kernel", "results-call3-paged-kernel.json"),
    ("call 4: + device argmax", "results-call4-device-argmax.json")]
runs = [(name, json.load(open(os.path.join(d, f)))) for name, f in calls]
# PEERS_FROM=FILE: take the peers from that call without plotting its own runs.
peer_file = os.environ.get("PEERS_FROM")
c2 = json.load(open(os.path.join(d, peer_file))) if peer_file else next(r for _, r in runs if "peer_llama_batched" in r and "peer_transformers" in r)
row = c2["peer_llama_batched"][-1]
cells = [c.strip() for c in row.strip("|").split("|")]
llama_out = 256 * 128 / float(cells[8])
# TRANSFORMERS_LABEL / LLAMA_LABEL: the peers' bar labels (say where they come from when it is
# not the plotted calls).
labels = [n for n, _ in runs] + [os.environ.get("TRANSFORMERS_LABEL", "transformers generate_batch"), os.environ.get("LLAMA_LABEL", "llama.cpp batched-bench")]
values = [r["offline"]["output_tokens_per_s"] for _, r in runs] + [c2["peer_transformers"]["output_tokens_per_s"], llama_out]
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
bars = a.barh(labels, values, color=["#4a7"] * len(runs) + ["#999", "#c74"])
a.bar_label(bars, fmt="%.0f")
a.set_xlabel("output tokens/s (256 requests x 512 prompt, 128 new)")
a.set_title(f"Offline throughput, Qwen3-4B bf16, {os.environ.get('PLOT_DEVICE', 'H200')}")
names = [n for n, _ in runs]
# A call without the shared-prefix runs shows no bars there.
on = [r.get("prefix_on", {}).get("mean_ttft_s", 0) for _, r in runs]
off = [r.get("prefix_off", {}).get("mean_ttft_s", 0) for _, r in runs]
y = range(len(names))
b.barh([i + 0.2 for i in y], off, height=0.4, label="prefix caching off", color="#999")
b.barh([i - 0.2 for i in y], on, height=0.4, label="prefix caching on", color="#4a7")
b.set_yticks(list(y), names)
b.set_xlabel("mean time to first token, s (64 x (2,048 shared + 64) tokens)")
b.set_title("Shared-prefix workload")
b.legend()
fig.suptitle(f"inference-pio serving core, commit {runs[-1][1]['commit']}, {os.environ.get('PLOT_DATE', '2026-12-02')}", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print("wrote", sys.argv[2])
