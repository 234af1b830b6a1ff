#!/usr/bin/env python3
"""Plot of run_bench_30b_peers.sh: decode tokens/s of the cut Qwen3-Coder-30B-A3B checkpoint
(both engines on the same file) at batch 1, 8, 32 and 64 — ours (`bench`'s throughput suite,
steady decode of `infer_batch` rows), llama.cpp (`llama-batched-bench`, S_TG) and transformers
eager at batch 1.

    python3 plot_bench_30b_peers.py RESULTS_DIR OUT.png

BEFORE=REPORT.json adds an earlier run of ours (its commit in the label) beside the others.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

d, out = sys.argv[1:3]
peers = json.load(open(os.path.join(d, "peers-30b.json")))
ours = json.load(open(os.path.join(d, "bench-30b-peers", "report.json")))
batches = [1, 8, 32, 64]
our_rows = {b["rows"]: b["steady_decode_tokens_per_s"] for b in ours["suites"]["throughput"]["batch"]}
llama = {}
for line in peers.get("llama_cpp_batched_bench", [])[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    llama[int(cells[2])] = float(cells[7])
tf = peers.get("transformers", {}).get("decode_tokens_per_s")
before = json.load(open(os.environ["BEFORE"])) if os.environ.get("BEFORE") else None
fig, ax = plt.subplots(figsize=(9, 4.6))
x = range(len(batches))
w = 0.22 if before else 0.28
bars = []
if before:
    rows = {b["rows"]: b["steady_decode_tokens_per_s"] for b in before["suites"]["throughput"]["batch"]}
    bars.append(ax.bar([i - 2 * w for i in x], [rows.get(b, 0) for b in batches], w, label=f"inference-pio {before['commit']}", color="#9cb"))
bars.append(ax.bar([i - w for i in x], [our_rows.get(b, 0) for b in batches], w, label=f"inference-pio {ours['commit']}", color="#4a7"))
bars.append(ax.bar(list(x), [llama.get(b, 0) for b in batches], w, label="llama.cpp batched-bench (BF16 GGUF)", color="#c74"))
if tf:
    bars.append(ax.bar([w], [tf], w, label="transformers eager (batch 1 only)", color="#999"))
for bars in bars:
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
ax.set_xticks(list(x), [f"batch {b}" for b in batches])
ax.set_ylabel("decode tokens/s (all rows)")
ax.set_title(f"Qwen3-Coder-30B-A3B, {peers['layers']} of {peers['of_layers']} layers, random bf16, one file for all; "
             f"{peers['device'].split(',')[0]}, peers' call at commit {peers['commit']}", fontsize=9)
ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
