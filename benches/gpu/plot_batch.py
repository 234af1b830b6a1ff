#!/usr/bin/env python3
"""Summarises one device call of benches/gpu/run_batch_4b.sh (a folder holding pio_{b1,b8,b32,
p512,p2048}.json from pio-bench and peer_{eager,static}.json from transformers_moe.py, all from
the same call) into BASE.json, the side-by-side table, and BASE.png.

    python3 benches/gpu/plot_batch.py FOLDER BASE "COMMAND" [COMMIT]

COMMIT overrides the commit pio-bench recorded (runs before pio-bench had --commit recorded
the device copy's checkout, not the binaries').
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

folder, base, command = sys.argv[1], sys.argv[2], sys.argv[3]
commit_override = sys.argv[4] if len(sys.argv) > 4 else None


def load(name):
    path = os.path.join(folder, name)
    return json.load(open(path)) if os.path.exists(path) else None


pio = {c: load(f"pio_{c}.json") for c in ["b1", "b8", "b32", "p512", "p2048"]}
eager, static = load("peer_eager.json") or {}, load("peer_static.json") or {}
ours = lambda case, key: (pio[case] or {}).get(key)
decode = [
    (f"decode, batch {b}", ours(f"b{b}", "median_steady_decode_tokens_per_s"), eager.get(f"decode_batch_{b}_tokens_per_s"),
     static.get(f"decode_batch_{b}_tokens_per_s"))
    for b in [1, 8, 32]
]
prefill = [
    (f"prefill, {n} tokens", ours(f"p{n}", "median_prefill_tokens_per_s"), eager.get(f"prefill_{n}_tokens_per_s"),
     static.get(f"prefill_{n}_tokens_per_s"))
    for n in [512, 2048]
]
memory = [
    (f"peak GPU MiB, {label}", ours(case, "peak_gpu_mib"), eager.get(key), static.get(key))
    for label, case, key in [("batch 1", "b1", "peak_gpu_mib_batch_1"), ("batch 32", "b32", "peak_gpu_mib_batch_32"),
                             ("prefill 2048", "p2048", "peak_gpu_mib_prefill_2048")]
]
any_pio = dict(next(p for p in pio.values() if p))
if commit_override:
    any_pio["commit"] = commit_override
record = {
    "benchmark": "Qwen3-4B-Instruct-2507 config, random bf16 weights, inference-pio (pio-bench) beside transformers",
    "date": any_pio["date"], "commit": any_pio["commit"], "machine": any_pio["machine"], "command": command,
    "transformers": {k: eager.get(k) for k in ["torch", "transformers"]},
    "time_to_first_token_s": {
        "cold_process": ours("b1", "cold_time_to_first_token_s"),
        "second_process": ours("b1", "second_process_time_to_first_token_s"),
        "warm_run_128_tokens": ours("b1", "median_time_to_first_token_s"),
    },
    "table": [{"metric": m, "inference_pio": a, "transformers_eager": e, "transformers_static_compile": s}
              for m, a, e, s in decode + prefill + memory],
    "inference_pio": pio, "transformers_eager": eager, "transformers_static": static,
}
json.dump(record, open(base + ".json", "w"), indent=1)
for row in record["table"]:
    cells = [row["metric"]] + [f"{row[k]:,.1f}" if isinstance(row[k], (int, float)) else "-"
                               for k in ["inference_pio", "transformers_eager", "transformers_static_compile"]]
    print(" | ".join(cells))

groups = [("decode tok/s", decode), ("prefill tok/s", prefill), ("peak GPU MiB", memory)]
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
for ax, (title, rows) in zip(axes, groups):
    width = 0.27
    for i, (label, color) in enumerate([("inference-pio", "tab:blue"), ("transformers eager", "tab:orange"),
                                        ("transformers static+compile", "tab:green")]):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ys = [r[1 + i] or 0 for r in rows]
        ax.bar(xs, ys, width, label=label, color=color)
    ax.set_xticks(range(len(rows)), [r[0].split(", ", 1)[1] for r in rows])
    ax.set_title(title)
axes[0].set_yscale("log")
axes[0].legend(fontsize=8)
fig.suptitle(f"Qwen3-4B shapes, random bf16 weights, {any_pio['machine'].split(',')[0]}, {any_pio['date'][:10]}, commit {any_pio['commit'][:9]}")
fig.tight_layout()
fig.savefig(base + ".png", dpi=110)
