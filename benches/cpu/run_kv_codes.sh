#!/usr/bin/env bash
# The 8-bit KV caches on the CPU (issue 21): the built-in SmolLM2-135M-Instruct (Q4_1 GGUF) with
# `kv_cache_dtype` auto (f32), int8 and fp8, decode and prefill after 128- and 2,048-token
# prompts, through pio-bench. Builds of the llama plugin to compare go in PLUGINS as
# `label=dir` pairs (each dir holding a libllama.so; default: this checkout's target/debug);
# ROUNDS interleaved rounds (default 3), medians reported. Writes OUT.json and OUT.png.
# Usage: benches/cpu/run_kv_codes.sh OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$1
GGUF=$(./target/debug/inference-pio models fetch)
MACHINE="$(nproc)-core $(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
PLUGINS=${PLUGINS:-now=$PWD/target/debug}
TMP=$(mktemp -d)
for kv in auto int8 fp8; do printf '[plugins.llama]\nkv_cache_dtype = "%s"\n' $kv > $TMP/$kv.toml; done
for round in $(seq ${ROUNDS:-3}); do
  for pair in $PLUGINS; do
    label=${pair%%=*}; dir=${pair#*=}
    for kv in auto int8 fp8; do
      for prompt in 128 2048; do
        INFERENCE_PIO_PLUGIN_DIR=$dir target/debug/pio-bench --host target/debug/inference-pio --config $TMP/$kv.toml \
          --model "$GGUF" --prompt-tokens $prompt --new-tokens 64 --processes 1 --runs 2 --machine "$MACHINE" \
          --out $TMP/run_${label}_${kv}_${prompt}_$round.json > /dev/null
      done
    done
  done
done
python3 - "$TMP" "$OUT" "$MACHINE" "$(git rev-parse --short HEAD)" "$PLUGINS" <<'PY'
import glob, json, os, statistics, sys
tmp, out, machine, commit, plugins = sys.argv[1:]
runs = {}
for path in glob.glob(tmp + "/run_*.json"):
    label, kv, prompt, _ = os.path.basename(path)[4:-5].rsplit("_", 3)
    d = json.load(open(path))
    r = runs.setdefault(f"{label} {kv} {prompt}", {"decode": [], "prefill": []})
    r["decode"].append(d["median_steady_decode_tokens_per_s"])
    r["prefill"].append(d["median_prefill_tokens_per_s"])
    r["kv_cache_dtype"] = d["processes"][0].get("kv_cache_dtype")
    r["kv_cache_blocks"] = d["processes"][0].get("kv_cache_blocks")
for r in runs.values():
    r["median_decode_tokens_per_s"] = statistics.median(r["decode"])
    r["median_prefill_tokens_per_s"] = statistics.median(r["prefill"])
json.dump({"machine": machine, "commit": commit, "plugins": plugins, "new_tokens": 64, "runs": runs}, open(out + ".json", "w"), indent=1)
for k in sorted(runs):
    print(f"{k:28} decode {runs[k]['median_decode_tokens_per_s']:6.1f}  prefill {runs[k]['median_prefill_tokens_per_s']:8.1f}  ({runs[k]['kv_cache_dtype']}, {runs[k]['kv_cache_blocks']} blocks)")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
labels = sorted(runs)
fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
for axis, key, title in ((ax, "median_decode_tokens_per_s", "decode tok/s"), (bx, "median_prefill_tokens_per_s", "prefill tok/s")):
    axis.barh(range(len(labels)), [runs[k][key] for k in labels])
    axis.set_yticks(range(len(labels)))
    axis.set_yticklabels(labels, fontsize=8)
    axis.set_xlabel(title)
fig.suptitle(f"SmolLM2-135M Q4_1 on the CPU, KV cache f32 / int8 / fp8 (plugin, cache, prompt tokens), {machine}, {commit}", fontsize=9)
fig.tight_layout()
fig.savefig(out + ".png", dpi=100)
PY
rm -rf $TMP
