"""Bar chart of gpu-h100-2026-12-07m-matvec-early-loads.md (the decode.txt files beside it)."""
import re, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = Path(__file__).parent
vals = {}
for f in sorted(here.glob("call*/decode.txt")):
    for line in f.read_text().splitlines():
        m = re.match(r"4B batch (\d), (\S+) round \d: steady decode ([\d.]+)", line)
        if m:
            key = {"LEGACY=1": "before", "LEGACY=0": "now", "LOADS=8": "8 loads", "EARLY=0": "early loads off"}[m[2]]
            vals.setdefault(("bf16", key), []).append(float(m[3]))
        m = re.match(r"(bf16|int8|int4|fp8) early (\d) round \d: steady decode ([\d.]+)", line)
        if m:
            vals.setdefault((m[1], "now" if m[2] == "1" else "early loads off"), []).append(float(m[3]))
order = [("bf16", "before"), ("bf16", "8 loads"), ("bf16", "early loads off"), ("bf16", "now"),
         ("int8", "early loads off"), ("int8", "now"), ("int4", "early loads off"), ("int4", "now"),
         ("fp8", "early loads off"), ("fp8", "now")]
names = {("fp8", "early loads off"): "fp8, tried\nread-ahead", ("fp8", "now"): "fp8, tried\nread-ahead + early"}
labels, means, lo, hi = [], [], [], []
for k in order:
    v = vals[k]
    labels.append(names.get(k, f"{k[0]}\n{k[1]}"))
    means.append(sum(v) / len(v)); lo.append(means[-1] - min(v)); hi.append(max(v) - means[-1])
fig, ax = plt.subplots(figsize=(11, 4.5))
colors = ["#999", "#c66", "#68a", "#2a6"] + ["#68a", "#2a6"] * 2 + ["#68a", "#bbb"]
ax.bar(range(len(labels)), means, yerr=[lo, hi], color=colors, capsize=3)
for i, m in enumerate(means):
    ax.text(i, m + 4, f"{m:.1f}", ha="center", fontsize=8)
ax.set_xticks(range(len(labels)), labels, fontsize=7)
ax.set_ylabel("steady decode tok/s (batch 1)")
ax.set_title("Qwen3-4B batch-1 decode on an H100 (random weights), matrix-vector kernels, 2026-12-07")
fig.tight_layout()
fig.savefig(here.parent / "gpu-h100-2026-12-07m-matvec-early-loads.png", dpi=110)
