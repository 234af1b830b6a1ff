"""Decode rate by weight mode and batch size from a run_quant_4b.sh results.json (pio-bench
`median_steady_decode_tokens_per_s` of each `MODE_CASE` entry), with an optional peer line.
Usage: plot_quant_rows.py RESULTS.json OUT.png TITLE [PEER_LABEL=TOKENS_PER_S]"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = json.load(open(sys.argv[1]))
modes = [m for m in ("bf16", "int8", "int4", "fp8") if f"{m}_b1" in d]
cases = [c for c in ("b1", "b8", "b32") if any(f"{m}_{c}" in d for m in modes)]
fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4))
axes = axes if len(cases) > 1 else [axes]
for ax, c in zip(axes, cases):
    vals = [d.get(f"{m}_{c}", {}).get("median_steady_decode_tokens_per_s") or 0 for m in modes]
    ax.bar(modes, vals, color=["#1f77b4", "#2ca02c", "#d62728", "#9467bd"][: len(modes)])
    for x, v in enumerate(vals):
        ax.text(x, v * 1.01, f"{v:.0f}", ha="center", fontsize=9)
    if c == "b1" and len(sys.argv) > 4:
        label, value = sys.argv[4].split("=")
        ax.axhline(float(value), color="#ff7f0e", linestyle="--", label=label)
        ax.legend(fontsize=8)
    ax.set_title(f"{c}: steady decode, tokens/s (all rows)", fontsize=9)
fig.suptitle(sys.argv[3], fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
