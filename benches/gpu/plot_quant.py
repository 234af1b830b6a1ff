import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.load(open(sys.argv[1]))
o = d["ours"]
peer = d[[k for k in d if k.startswith("llama.cpp")][0]]
bars = [
    ("ours bf16", o["bf16"]["b1"][0], "#1f77b4"),
    ("ours int8\n(dp4a)", o["int8 (per channel, made at load), dp4a kernel"]["b1"][0], "#1f77b4"),
    ("ours int4\n(dp4a)", o["int4 (groups of 128, made at load), dp4a kernel"]["b1"][0], "#1f77b4"),
    ("ours Q4_K_M\nkept (1st kernel)", o["GGUF Q4_K_M kept, first kernel"]["b1"][0], "#1f77b4"),
    ("ours Q4_K_M\ndequantized", o["GGUF Q4_K_M dequantized to bf16 (quantization = \"none\")"]["b1"][0], "#1f77b4"),
    ("llama.cpp\nBF16", peer["BF16"]["b1"], "#ff7f0e"),
    ("llama.cpp\nQ8_0", peer["Q8_0"]["b1"], "#ff7f0e"),
    ("llama.cpp\nQ4_K_M", peer["Q4_K_M"]["b1"], "#ff7f0e"),
]
fig, ax = plt.subplots(figsize=(11, 4.8))
xs = range(len(bars))
ax.bar(xs, [b[1] for b in bars], color=[b[2] for b in bars])
for x, b in zip(xs, bars):
    ax.text(x, b[1] + 4, f"{b[1]:.0f}", ha="center", fontsize=9)
ax.set_xticks(list(xs))
ax.set_xticklabels([b[0] for b in bars], fontsize=8)
ax.set_ylabel("batch-1 decode, tokens/s")
ax.set_title("Qwen3-4B shape, quantized weights, H200 (2026-12-05; ours: calls 2-3, llama.cpp: call 2)", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
