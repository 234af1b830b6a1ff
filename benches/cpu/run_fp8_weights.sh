#!/usr/bin/env bash
# FP8 weights on the CPU (issue 21): the built-in SmolLM2 GGUF with its linear weights made FP8
# at load (`quantization = "fp8"`) beside int8 per channel (`"int8"`) and the file's own Q4_1
# blocks (unset), through pio-bench, ROUNDS interleaved rounds (default 3), 32 prompt tokens and
# 128 new. Writes BASE.json and BASE.png (default benches/results/cpu-DATE-fp8-weights) and prints
# medians.
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=$(./target/debug/inference-pio models fetch)
ROUNDS=${ROUNDS:-3}
BASE=${BASE:-benches/results/cpu-$(date -u +%F)-fp8-weights}
MACHINE="$(nproc)-core $(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
: > /tmp/w_stored.toml
printf '[plugins.llama]\nquantization = "int8"\n' > /tmp/w_int8.toml
printf '[plugins.llama]\nquantization = "fp8"\n' > /tmp/w_fp8.toml
for r in $(seq "$ROUNDS"); do
  for mode in stored int8 fp8; do
    target/debug/pio-bench --host target/debug/inference-pio --config /tmp/w_$mode.toml --model "$GGUF" \
      --prompt-tokens 32 --new-tokens 128 --device cpu --dtype f32 --processes 1 \
      --machine "$MACHINE" --out /tmp/w_${mode}_$r.json
  done
done
python3 - "$BASE" "$ROUNDS" <<'PY'
import json, statistics, sys
base, rounds = sys.argv[1], int(sys.argv[2])
runs = {m: [json.load(open(f"/tmp/w_{m}_{r}.json")) for r in range(1, rounds + 1)] for m in ("stored", "int8", "fp8")}
out = {"command": "bash benches/cpu/run_fp8_weights.sh", "machine": runs["stored"][0]["machine"], "date": runs["stored"][0]["date"],
       "commit": runs["stored"][0]["commit"], "rounds": rounds, "runs": runs,
       "medians": {m: {k: statistics.median(x[k] for x in v) for k in ("median_prefill_tokens_per_s", "median_decode_tokens_per_s", "peak_rss_mib")} for m, v in runs.items()}}
json.dump(out, open(base + ".json", "w"), indent=1)
for m, v in out["medians"].items():
    print(m, {k: round(x, 1) for k, x in v.items()})
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
modes, labels = ["stored", "int8", "fp8"], ["Q4_1 kept\n(default)", "int8\nper channel", "fp8\n128x128"]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
for ax, (k, t) in zip(axes, [("median_decode_tokens_per_s", "decode tok/s"), ("median_prefill_tokens_per_s", "prefill tok/s")]):
    v = [out["medians"][m][k] for m in modes]
    ax.bar(range(3), v, color=["#1f77b4", "#2ca02c", "#9467bd"])
    ax.set_xticks(range(3), labels)
    ax.set_title(t)
    for i, x in enumerate(v):
        ax.text(i, x, f"{x:.1f}", ha="center", va="bottom")
fig.suptitle(f"SmolLM2-135M on the CPU by weight storage - {out['machine']} - {out['date']} @ {out['commit']}", fontsize=8)
fig.tight_layout()
fig.savefig(base + ".png", dpi=100)
PY
