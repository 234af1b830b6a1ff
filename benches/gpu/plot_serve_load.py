#!/usr/bin/env python3
"""Summarises one device call of benches/gpu/run_serve_load.sh (FOLDER/load.jsonl from
benches/serve_load.py, FOLDER/run_b1.json from `inference-pio run`) into BASE.json, a
side-by-side markdown table on stdout, and BASE.png: output throughput and p99 TTFT per
workload, and mean ITL against output throughput, for every server measured.

    python3 benches/gpu/plot_serve_load.py FOLDER BASE
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

folder, base = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(os.path.join(folder, "load.jsonl")) if l.strip()]


def name(r):
    if r["workload"] == "prefix":
        return f"prefix c{r['concurrency']}"
    if r["rate"]:
        return f"rate {r['rate']:g}/s"
    return f"c{r['concurrency']}"


labels = list(dict.fromkeys(r["label"] for r in runs))
workloads = list(dict.fromkeys(name(r) for r in runs))
by = {(r["label"], name(r)): r for r in runs}
summary = {"runs": runs}
b1 = os.path.join(folder, "run_b1.json")
if os.path.exists(b1):
    try:
        d = json.load(open(b1))
        summary["run_b1"] = {"steady_decode_tokens_per_s": d["timings"]["steady_decode_tokens_per_s"],
                             "decode_tokens_per_s": d["timings"]["decode_tokens_per_s"],
                             "runs": [r.get("steady_decode_tokens_per_s") for r in d.get("runs", [])]}
    except (ValueError, KeyError) as e:
        summary["run_b1"] = {"error": str(e)}
for f in ("commit.txt", "device.txt"):
    p = os.path.join(folder, f)
    if os.path.exists(p):
        summary[f[:-4]] = open(p).read().strip()
json.dump(summary, open(base + ".json", "w"), indent=1)

print("| workload | server | completed | req/s | output tok/s | TTFT mean / p99 ms | TPOT mean ms | ITL mean / p99 ms | E2E p99 ms | goodput req/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
f = lambda v, d=0: "–" if v is None else f"{v:,.{d}f}"
for w in workloads:
    for l in labels:
        r = by.get((l, w))
        if not r:
            continue
        errs = sum(r["errors"].values())
        print(f"| {w} | {l} | {r['completed']}/{r['num_prompts']}{' (' + str(errs) + ' errors)' if errs else ''} | {f(r['request_throughput'], 2)} | "
              f"{f(r['output_throughput'])} | {f(r['ttft_ms']['mean'])} / {f(r['ttft_ms']['p99'])} | {f(r['tpot_ms']['mean'], 1)} | "
              f"{f(r['itl_ms']['mean'], 1)} / {f(r['itl_ms']['p99'], 1)} | {f(r['e2e_ms']['p99'])} | {f(r['goodput'], 2)} |")

fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
width = 0.8 / max(1, len(labels))
for i, l in enumerate(labels):
    xs = [j + i * width for j in range(len(workloads))]
    axes[0].bar(xs, [by[(l, w)]["output_throughput"] if (l, w) in by else 0 for w in workloads], width, label=l)
    axes[1].bar(xs, [(by[(l, w)]["ttft_ms"]["p99"] or 0) if (l, w) in by else 0 for w in workloads], width, label=l)
    pts = sorted((by[(l, w)]["output_throughput"], by[(l, w)]["itl_ms"]["mean"]) for w in workloads if (l, w) in by and by[(l, w)]["itl_ms"]["mean"])
    axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=l)
for ax, title in zip(axes[:2], ["output tokens/s", "p99 time to first token (ms)"]):
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(workloads))])
    ax.set_xticklabels(workloads, rotation=20)
    ax.set_title(title)
    ax.legend()
axes[1].set_yscale("log")
axes[2].set_xlabel("output tokens/s")
axes[2].set_ylabel("mean inter-token latency (ms)")
axes[2].set_title("latency against throughput")
axes[2].legend()
fig.suptitle(f"Qwen3-4B bf16 (random weights), random 512-token prompts (prefix: 1,024 shared + 64), 128 output tokens — {summary.get('device', '')}, binaries {summary.get('commit', '?')}")
fig.tight_layout()
fig.savefig(base + ".png", dpi=110)
print("wrote", base + ".json", base + ".png")
