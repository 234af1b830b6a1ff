#!/usr/bin/env python3
"""Plot of the one-launch prefill attention kernel (H100, 2026-12-06): per-layer time of the
kernel and of the gathered reference on kernel_check's prefill cases (bf16), and the speed
suite's time to first token by prompt length before the kernel (3aaebcc: reference
everywhere) and with the kernel everywhere (959ceed).

    python3 plot_prefill_kernel.py RESULTS_DIR OUT.png
"""
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

d, out = sys.argv[1], sys.argv[2]
cases = []
for line in open(os.path.join(d, "kernel_check.txt")):
    m = re.match(r"(.*prefill.*?)\s+BF16\s*: rel L2 \S+ ok \| kernel\s+([\d.]+) µs.*\| before\s+([\d.]+) µs", line)
    if m:
        cases.append((m.group(1).strip(), float(m.group(2)), float(m.group(3))))
fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
y = range(len(cases))
a.barh([i + 0.2 for i in y], [c[1] for c in cases], height=0.4, color="#4a7", label="kernel (one launch)")
a.barh([i - 0.2 for i in y], [c[2] for c in cases], height=0.4, color="#999", label="reference (gathered, cuBLAS)")
a.set_yticks(list(y), [c[0] for c in cases], fontsize=8)
a.set_xscale("log")
a.set_xlabel("µs a layer (CUDA-graph replays), bf16")
a.legend(fontsize=8)
a.set_title("kernel_check attention: prefill cases")
speed = {}
for name, f in (("before (reference, 3aaebcc)", "speed-before.json"), ("kernel everywhere (959ceed)", "speed-kernel-only.json")):
    rows = [c for c in json.load(open(os.path.join(d, f)))["speed"]["cases"] if c["kind"] == "prompt"]
    speed[name] = {c["prompt_tokens"]: c["time_to_first_token_s"] * 1e3 for c in rows}
lengths = sorted(next(iter(speed.values())))
for i, (name, v) in enumerate(speed.items()):
    b.bar([j + (i - 0.5) * 0.4 for j in range(len(lengths))], [v[n] for n in lengths], width=0.4, label=name, color=["#999", "#4a7"][i])
b.set_xticks(range(len(lengths)), [str(n) for n in lengths])
b.set_xlabel("prompt tokens (Qwen3-4B, bf16, batch 1)")
b.set_ylabel("time to first token, ms")
b.legend(fontsize=8)
b.set_title("speed suite: time to first token")
fig.suptitle("inference-pio prefill attention, H100, 2026-12-06", fontsize=10)
fig.tight_layout()
fig.savefig(out, dpi=100)
print("wrote", out)
