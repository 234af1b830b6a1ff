#!/usr/bin/env bash
# One device call: run_decode_graphs.sh for Qwen3-4B, then for Qwen3-Coder-30B-A3B, each into
# its own folder, packed into $OUT/results.tar.xz (the transfer returns few files).
# Carried: .gpu/inference-pio.xz, .gpu/libqwen3_4b_instruct_2507.so.xz, .gpu/libqwen3_coder_30b.so.xz.
set -uo pipefail
ROOT_OUT=$OUT
mkdir -p $ROOT_OUT/4b $ROOT_OUT/30b
OUT=$ROOT_OUT/4b WARM=0 BUDGET=250 TINY_DTYPES="f32 bf16" bash benches/gpu/run_decode_graphs.sh 4b 2>&1 | tee $ROOT_OUT/4b/log.txt | grep -v '^  \|^ "' | tail -40
OUT=$ROOT_OUT/30b WARM=0 BUDGET=$(( 565 - SECONDS )) TINY_DTYPES="f32" bash benches/gpu/run_decode_graphs.sh 30b 2>&1 | tee $ROOT_OUT/30b/log.txt | grep -v '^  \|^ "' | tail -40
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT 4b 30b && rm -rf $ROOT_OUT/4b $ROOT_OUT/30b
echo "both used $SECONDS s"
