#!/usr/bin/env bash
# CPU benchmark, inference-pio beside transformers on the same random-weight Qwen3 checkpoint
# (benches/configs/qwen3-small.json, ~0.11 B parameters) and the same prompt ids, in one run.
# Writes benches/results/cpu-qwen3-small.json and .png (with BATCH=N > 1: N copies of the prompt
# decoded together on both sides, cpu-qwen3-small-batchN.*). Needs: cargo build, pip install
# torch transformers matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."
CK=${TMPDIR:-/tmp}/pio-qwen3-small-random
PROMPT=${PROMPT:-128}
NEW=${NEW:-32}
BATCH=${BATCH:-1}
NAME=cpu-qwen3-small; [ "$BATCH" != 1 ] && NAME=cpu-qwen3-small-batch$BATCH
[ -f "$CK/model.safetensors" ] || python3 benches/peers/transformers_qwen3.py --device cpu --make-checkpoint "$CK" \
  --config benches/configs/qwen3-small.json --tokenizer-dir plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer
MACHINE="$(nproc)-core $(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
OUTDIR=benches/results
target/debug/pio-bench --host target/debug/inference-pio --model "$CK" --prompt-tokens "$PROMPT" --new-tokens "$NEW" \
  --batch "$BATCH" --device cpu --dtype f32 --processes 3 --machine "$MACHINE" --out /tmp/pio.json
python3 benches/peers/transformers_qwen3.py --device cpu --dtype f32 --model "$CK" --prompt-tokens "$PROMPT" \
  --new-tokens "$NEW" --batch "$BATCH" --out /tmp/peer.json
BENCH_NAME="qwen3-small random weights, batch $BATCH, f32" python3 benches/plot_results.py /tmp/pio.json /tmp/peer.json \
  "$OUTDIR/$NAME" "BATCH=$BATCH bash benches/cpu/run_cpu_bench.sh"
