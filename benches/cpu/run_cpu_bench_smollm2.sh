#!/usr/bin/env bash
# CPU benchmark of the built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF): inference-pio
# (dequantized to f32 at load) beside transformers loading the same GGUF (dequantized to f32),
# same prompt ids, in one run. Writes benches/results/cpu-smollm2-135m.json and .png.
# Needs: cargo build, ./target/debug/inference-pio models fetch, pip install torch transformers gguf accelerate matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=$(./target/debug/inference-pio models fetch)
PROMPT=${PROMPT:-128}
NEW=${NEW:-32}
MACHINE="$(nproc)-core $(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
target/debug/pio-bench --host target/debug/inference-pio --model "$GGUF" --prompt-tokens "$PROMPT" --new-tokens "$NEW" \
  --device cpu --dtype f32 --repeats 3 --machine "$MACHINE" --out /tmp/pio-smollm2.json
python3 benches/peers/transformers_qwen3.py --device cpu --dtype f32 --gguf "$GGUF" --prompt-tokens "$PROMPT" \
  --new-tokens "$NEW" --out /tmp/peer-smollm2.json
BENCH_NAME="SmolLM2-135M-Instruct Q4_1 GGUF (dequantized), batch 1, f32" \
  python3 benches/plot_results.py /tmp/pio-smollm2.json /tmp/peer-smollm2.json benches/results/cpu-smollm2-135m "bash benches/cpu/run_cpu_bench_smollm2.sh"
