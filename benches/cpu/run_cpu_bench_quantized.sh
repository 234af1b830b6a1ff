#!/usr/bin/env bash
# CPU benchmark of the built-in default model from its GGUF (SmolLM2-135M-Instruct Q4_1), side
# by side with the pinned llama.cpp peer on the same cores in one run: inference-pio with the
# quantized blocks kept (the default, exact f32 activations), kept with 8-bit activation blocks
# in the products (`quant_activations = "int8"`, llama.cpp's own), and dequantized to f32
# (`quantization = "none"`), and
# `llama-bench -t THREADS` on the same file. Prompt and generation lengths match llama-bench's
# (`-p PROMPT -n NEW`): our prefill figure is the prompt of a run, our decode figure the new
# tokens after it (llama-bench's tg starts from an empty context). Writes
# benches/results/cpu-DATE-quantized-smollm2.{json,png}.
# Needs: cargo build; ./target/debug/inference-pio models fetch; a CPU build of llama.cpp
# (LLAMA_BIN, default /tmp/llama-cpu/build/bin: `bash ../shared/peers/build_llamacpp.sh --cpu
# --wait /tmp/llama-cpu`, ~10 min on 2 cores; on a VM that lists AMX but faults on it, llama-bench
# dies with SIGILL in `tinygemm_kernel_amx`: reconfigure with CMAKE_C_FLAGS and CMAKE_CXX_FLAGS
# "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" and rebuild `llama-bench`); python3 with matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."
# GGUF=FILE benchmarks another GGUF file instead (e.g. the Qwen3 shapes that
# benches/cpu/make_qwen3_small_gguf.py makes), TITLE naming it in the results.
export GGUF=${GGUF:-$(./target/debug/inference-pio models fetch)}
export TITLE=${TITLE:-SmolLM2-135M-Instruct Q4_1 GGUF}
# The plugin that serves the file, whose config section the modes are set in (qwen3-4b-instruct-2507
# for Qwen3 files).
PLUGIN=${PLUGIN:-llama}
PROMPT=${PROMPT:-32}
NEW=${NEW:-128}
THREADS=${THREADS:-$(nproc)}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/build/bin}
DATE=$(date -u +%F)
BASE=${BASE:-benches/results/cpu-$DATE-quantized-smollm2}
MACHINE="$(nproc)-core $(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '[plugins.%s]\nquantization = "none"\n' "$PLUGIN" > /tmp/q_none.toml
: > /tmp/q_stored.toml
printf '[plugins.%s]\nquant_activations = "int8"\n' "$PLUGIN" > /tmp/q_int8.toml
# Rounds alternate every mode and the peer (one process / one llama-bench repetition each), so
# a shared VM whose speed drifts over minutes (2x between phases on the 2026-12-06 Xeon VM)
# moves all of them alike; the table takes each one's median over the rounds.
ROUNDS=${ROUNDS:-3}
for r in $(seq "$ROUNDS"); do
  for mode in stored int8 none; do
    target/debug/pio-bench --host target/debug/inference-pio --config /tmp/q_$mode.toml --model "$GGUF" \
      --prompt-tokens "$PROMPT" --new-tokens "$NEW" --device cpu --dtype f32 --processes 1 \
      --machine "$MACHINE" --out /tmp/pio_${mode}_$r.json
  done
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p "$PROMPT" -n "$NEW" -r 1 -o json > /tmp/llama_bench_$r.json
done
/usr/bin/time -f '%M' -o /tmp/llama_rss.txt "$LLAMA_BIN/llama-bench" -m "$GGUF" -t "$THREADS" -p 0 -n "$NEW" -r 1 -o json > /dev/null
python3 - "$BASE" "bash benches/cpu/run_cpu_bench_quantized.sh" "$MACHINE" "$THREADS" "$ROUNDS" <<'PY'
import json, os, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
base, command, machine, threads, rounds = sys.argv[1:6]
rounds = range(1, int(rounds) + 1)
runs = {m: [json.load(open(f"/tmp/pio_{m}_{r}.json")) for r in rounds] for m in ("stored", "int8", "none")}
peers = [json.load(open(f"/tmp/llama_bench_{r}.json")) for r in rounds]
pps = [next(x for x in p if x["n_prompt"] > 0 and x["n_gen"] == 0) for p in peers]
tgs = [next(x for x in p if x["n_gen"] > 0 and x["n_prompt"] == 0) for p in peers]
pp, tg = pps[0], tgs[0]
llama_rss = int(open("/tmp/llama_rss.txt").read().split()[-1]) / 1024
med = statistics.median
pio = {m: {**runs[m][0], "rounds": runs[m], **{k: med(x[k] for x in runs[m]) for k in ("median_prefill_tokens_per_s", "median_decode_tokens_per_s", "peak_rss_mib")}} for m in runs}
rows = [
    (metric, [pio[m][key] for m in ("stored", "int8", "none")] + [peer_value])
    for metric, key, peer_value in [
        ("prefill tok/s", "median_prefill_tokens_per_s", med(x["avg_ts"] for x in pps)),
        ("decode tok/s", "median_decode_tokens_per_s", med(x["avg_ts"] for x in tgs)),
        ("peak RSS (MiB)", "peak_rss_mib", llama_rss),
    ]
]
# Per round, ours over the peer's (the same minutes of the machine).
ratios = {m: {"prefill": [x["median_prefill_tokens_per_s"] / p["avg_ts"] for x, p in zip(runs[m], pps)],
              "decode": [x["median_decode_tokens_per_s"] / t["avg_ts"] for x, t in zip(runs[m], tgs)]} for m in runs}
names = ["inference-pio blocks kept (default, exact activations)", "inference-pio blocks kept, int8 activations", "inference-pio dequantized f32", f"llama.cpp -t {threads}"]
result = {
    "benchmark": os.environ["TITLE"] + " on the CPU, batch 1", "model_file": os.environ["GGUF"],
    "date": pio["stored"]["date"], "commit": pio["stored"]["commit"], "command": command, "machine": machine,
    "threads": int(threads), "rounds": len(rounds),
    "llama_cpp": {"build_commit": pp.get("build_commit"), "pp": pps, "tg": tgs, "peak_rss_mib": llama_rss},
    "inference_pio": pio, "ratios_per_round": ratios,
    "table": [{"metric": m, **dict(zip(names, v))} for m, v in rows],
}
json.dump(result, open(base + ".json", "w"), indent=1)
fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.8))
for ax, (metric, values) in zip(axes, rows):
    ax.bar(range(4), values, color=["#1f77b4", "#6baed6", "#c6dbef", "#ff7f0e"])
    ax.set_xticks(range(4), ["ours, blocks\n(default)", "ours, blocks\nint8 acts", "ours f32", "llama.cpp"])
    ax.set_title(metric)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
fig.suptitle(f"{result['benchmark']} - {machine} - {result['date']} @ {result['commit']}", fontsize=9)
fig.tight_layout()
fig.savefig(base + ".png", dpi=100)
for m, v in rows:
    print(f"{m:18s} " + "   ".join(f"{n} {x:9.2f}" for n, x in zip(names, v)))
for m, r in ratios.items():
    print(f"{m:7s} over llama.cpp per round: prefill " + " ".join(f"{x:.2f}" for x in r["prefill"]) + ", decode " + " ".join(f"{x:.2f}" for x in r["decode"]))
PY
