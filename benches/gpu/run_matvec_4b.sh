#!/usr/bin/env bash
# One device call: Qwen3-4B after the matrix-vector kernel: tiny f32/bf16 parity on CUDA,
# inference-pio with graphs and eager, transformers eager and static cache + compile.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz. Results in $OUT/results.tar.xz.
set -uo pipefail
ROOT_OUT=$OUT
mkdir -p $ROOT_OUT/4b
OUT=$ROOT_OUT/4b WARM=1 BUDGET=540 NEW_TOKENS=64 TINY_DTYPES="f32 bf16" TINY_MODELS=qwen3-tiny-b PEERS="eager static" bash benches/gpu/run_decode_graphs.sh 4b 2>&1 | tee $ROOT_OUT/4b/log.txt | grep -v '^  \|^ "' | tail -40
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT 4b && rm -rf $ROOT_OUT/4b
echo "used $SECONDS s"
