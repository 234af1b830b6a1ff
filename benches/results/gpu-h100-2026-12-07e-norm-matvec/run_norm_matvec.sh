#!/usr/bin/env bash
# One device call for the residual add + RMSNorm fused into the next product (issue 20,
# `matvec::norm_matvec`): kernel_check's matvec group (the fused kernel against the two it
# replaces, bit for bit); the tiny Qwen3 fixtures on CUDA (f32 logits and greedy tokens, bf16);
# Qwen3-4B's real config (random bf16 weights) decode at batch 1 and 2, the plugin before
# (.gpu/before) and after, alternating over ROUNDS rounds (pio-bench, 128-token prompt, 256 new).
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,kernel_check,qwen3-tokenizer.json}.xz,
# .gpu/before/libqwen3_4b_instruct_2507.so.xz, .gpu/COMMIT; the tree holds
# plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-{b,c}.
set -uo pipefail
source benches/gpu/lib.sh
T=plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer
mkdir -p $T && [ -f .gpu/qwen3-tokenizer.json.xz ] && xz -dc .gpu/qwen3-tokenizer.json.xz > $T/tokenizer.json
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so kernel_check
mkdir -p .gpu/before && xz -dc .gpu/before/libqwen3_4b_instruct_2507.so.xz > .gpu/before/libqwen3_4b_instruct_2507.so && cp .gpu/bin/inference-pio .gpu/before/
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout 150 .gpu/bin/kernel_check matvec 2>&1 | grep -v "^\[" > $OUT/kernel_check_matvec.txt; echo "kernel_check exit $?"
grep -E "^norm|FAIL|passed|failed" $OUT/kernel_check_matvec.txt
F=plugins/qwen3-4b-instruct-2507/tests/fixtures
export INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
for m in qwen3-tiny-b qwen3-tiny-c; do gpu_parity $F $m f32 bf16 2>&1 | grep -E "worst|False"; done
echo "parity done at $SECONDS s"
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
for r in $(seq ${ROUNDS:-3}); do
  for which in before bin; do
    for b in 1 2; do
      INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/$which timeout 120 .gpu/bin/pio-bench --host .gpu/$which/inference-pio --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
        --batch $b --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
        --commit "$which $(cat .gpu/COMMIT)" --out /tmp/pio_${which}_b${b}_r$r.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
      python3 -c "import json; d=json.load(open('/tmp/pio_${which}_b${b}_r$r.json')); print('round $r $which batch $b: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1 | tee -a $OUT/decode.txt
    done
  done
done
echo "all done at $SECONDS s"
