#!/usr/bin/env bash
# A short device call on a session's final binaries: the tiny Qwen3 fixture on CUDA in f32 and
# bf16 against transformers, the tiny Qwen3-VL fixture's one-image prompt in f32, and Qwen3-4B
# (real config, random bf16 weights, pio-bench, 128-token prompt, 256 new) batch-1 decode twice.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,libqwen3_vl_2b.so,
# qwen3-tokenizer.json}.xz and .gpu/COMMIT; the tree holds
# plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b and plugins/qwen3-vl-2b/tests.
set -uo pipefail
source benches/gpu/lib.sh
device_setup inference-pio pio-bench libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so
gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 bf16 2>&1 | grep -E "worst|identical: False"
vl_tiny_one_image vl-tiny-a f32 | tee -a $OUT/decode.txt
for r in 1 2; do bench_4b_decode 1 "round $r"; done
echo "all done at $SECONDS s"
