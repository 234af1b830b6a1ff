#!/usr/bin/env bash
# One device call after the decode-attention kernel (kernels/src/attention.rs): kernel_check
# (matvec and attention against their references, timed), then Qwen3-4B end to end: tiny
# f32/bf16 parity on CUDA, graphs and eager, transformers eager and static cache + compile.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so,kernel_check}.xz.
# Env, for a shorter call: CHECKS (kernel_check's argument: "attention" for those checks
# only), TINY_DTYPES (default "f32 bf16"), PEERS (default "eager static"; " " for none),
# BUDGET (s for the whole call, default 560).
set -uo pipefail
ROOT_OUT=$OUT
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio kernel_check
mkdir -p $ROOT_OUT/kernels $ROOT_OUT/4b
timeout 150 .gpu/bin/kernel_check ${CHECKS:-} 2>&1 | tee $ROOT_OUT/kernels/kernel_check.txt | grep -v "^\[" | grep -E "attention|FAIL|passed|failed" ; echo "kernel_check exit ${PIPESTATUS[0]} at $SECONDS s"
OUT=$ROOT_OUT/4b WARM=0 BUDGET=$(( ${BUDGET:-560} - SECONDS )) NEW_TOKENS=64 TINY_DTYPES="${TINY_DTYPES:-f32 bf16}" TINY_MODELS=qwen3-tiny-b PEERS="${PEERS:-eager static}" bash benches/gpu/run_decode_graphs.sh 4b 2>&1 | tee $ROOT_OUT/4b/log.txt | grep -v '^  \|^ "' | grep -v "layer .* queued" | tail -30
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT kernels 4b && rm -rf $ROOT_OUT/kernels $ROOT_OUT/4b
echo "used $SECONDS s"
