#!/usr/bin/env bash
# One short device call after the split-K linears: per model one tiny fixture's f32 parity on
# CUDA, inference-pio with graphs and eager (tokens must be equal), transformers eager.
# Results packed into $OUT/results.tar.xz.
set -uo pipefail
ROOT_OUT=$OUT
mkdir -p $ROOT_OUT/30b $ROOT_OUT/4b
OUT=$ROOT_OUT/30b WARM=0 BUDGET=110 NEW_TOKENS=48 TINY_DTYPES=f32 TINY_MODELS=qwen3moe-tiny-a PEERS=eager bash benches/gpu/run_decode_graphs.sh 30b 2>&1 | tee $ROOT_OUT/30b/log.txt | grep -v '^  \|^ "' | tail -30
OUT=$ROOT_OUT/4b WARM=0 BUDGET=$(( 205 - SECONDS )) NEW_TOKENS=48 TINY_DTYPES=f32 TINY_MODELS=qwen3-tiny-b PEERS=eager bash benches/gpu/run_decode_graphs.sh 4b 2>&1 | tee $ROOT_OUT/4b/log.txt | grep -v '^  \|^ "' | tail -30
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT 30b 4b && rm -rf $ROOT_OUT/30b $ROOT_OUT/4b
echo "final used $SECONDS s"
