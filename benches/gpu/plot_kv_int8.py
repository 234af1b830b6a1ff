"""Plot benches/gpu/run_kv_int8_4b.sh's results.json: steady decode tok/s with the KV cache in
bf16, int8 and fp8 where measured (batch 1 after 128 and 8,192 prompt tokens, batch 32), and the 8,192-token
sequences each cache holds in the same memory. Usage: plot_kv_int8.py results.json out.png"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = json.load(open(sys.argv[1]))
cases = [("b1", "batch 1, 128 + 256"), ("l8k", "batch 1, 8,192 + 128"), ("b32", "batch 32, 128 + 128")]
fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [3, 1]})
kvs = [kv for kv in ["bf16", "int8", "fp8"] if any(f"{kv}_{c}" in d for c, _ in cases)]
colors = {"bf16": "#1f77b4", "int8": "#ff7f0e", "fp8": "#2ca02c"}
width = 0.8 / max(len(kvs), 1)
for i, kv in enumerate(kvs):
    xs, ys = [], []
    for j, (c, _) in enumerate(cases):
        r = d.get(f"{kv}_{c}", {})
        v = r.get("median_steady_decode_tokens_per_s")
        if v:
            xs.append(j + (i - (len(kvs) - 1) / 2) * width)
            ys.append(v)
    ax.bar(xs, ys, width, label=f"KV cache {kv}", color=colors[kv])
    for x, y in zip(xs, ys):
        ax.text(x, y * 1.02, f"{y:.0f}", ha="center", fontsize=8)
ax.set_yscale("log")
ax.set_xticks(range(len(cases)))
ax.set_xticklabels([n for _, n in cases], fontsize=9)
ax.set_ylabel("steady decode, tokens/s (log)")
ax.legend(fontsize=8)
fits = []
for kv in kvs:
    p = d.get(f"{kv}_b1", {}).get("processes", [{}])[0]
    blocks, bt = p.get("kv_cache_blocks"), p.get("kv_block_tokens")
    fits.append(blocks * bt // 8192 if blocks and bt else 0)
bx.bar(range(len(kvs)), fits, color=[colors[kv] for kv in kvs])
for x, y in enumerate(fits):
    bx.text(x, y + 1, str(y), ha="center", fontsize=9)
bx.set_xticks(range(len(kvs)))
bx.set_xticklabels(kvs)
bx.set_ylabel("8,192-token sequences that fit")
fig.suptitle(f"Qwen3-4B shape (random weights), KV cache {' vs '.join(kvs)}, {d.get('device', '')} ({d.get('commit', '')})", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
