#!/usr/bin/env bash
# One short device call after the attention kernel went to 16 planes per cube: its checks only
# (kernel_check attention), then Qwen3-4B tiny f32 parity and graphs/eager, no peers.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so,kernel_check}.xz.
set -uo pipefail
ROOT_OUT=$OUT
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio kernel_check
chmod +x .gpu/bin/kernel_check
mkdir -p $ROOT_OUT/kernels $ROOT_OUT/4b
timeout 100 .gpu/bin/kernel_check attention 2>&1 | tee $ROOT_OUT/kernels/kernel_check.txt | grep -v "^\[" | grep -E "attention|FAIL|passed|failed" ; echo "kernel_check exit ${PIPESTATUS[0]} at $SECONDS s"
OUT=$ROOT_OUT/4b WARM=0 BUDGET=$(( 180 - SECONDS )) NEW_TOKENS=64 TINY_DTYPES=f32 TINY_MODELS=qwen3-tiny-b PEERS=" " bash benches/gpu/run_decode_graphs.sh 4b 2>&1 | tee $ROOT_OUT/4b/log.txt | grep -v '^  \|^ "' | grep -v "layer .* queued" | tail -30
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT kernels 4b && rm -rf $ROOT_OUT/kernels $ROOT_OUT/4b
echo "used $SECONDS s"
