#!/usr/bin/env bash
# A two-minute device call for programmatic dependent launch (INFERENCE_PIO_PDL, on by default):
# the tiny Qwen3 fixture qwen3-tiny-b on CUDA in f32 with it off and on, a recorded chain's cost per
# kernel (kernel_check launch) off and on, Qwen3-4B (real config, random bf16 weights, pio-bench
# 128-token prompt, 256 new) batch-1 decode off / on / off / on, the tiny Qwen3-VL fixture's
# one-image prompt in f32, and Qwen3-VL-2B's decode after a 448x448 image off / on.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,libqwen3_vl_2b.so,
# kernel_check,qwen3-tokenizer.json}.xz and .gpu/COMMIT; the tree holds
# plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b and plugins/qwen3-vl-2b/tests.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so kernel_check
ensure_cublas
# Dependent launches are on unless INFERENCE_PIO_PDL=0; the checks below run with them on (a variant sets its own).
export INFERENCE_PIO_PDL=1
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
INFERENCE_PIO_PDL=0 gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 2>&1 | tail -3
gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 2>&1 | tail -3
echo "parity done at $SECONDS s"
# CubeCL's compilation log of the launch group's kernels with the injected wait, for a kernel
# NVRTC would refuse.
CUBECL_DEBUG_LOG=/tmp/cubecl.log timeout 40 .gpu/bin/kernel_check launch > /dev/null 2>&1
grep -c "griddepcontrol" /tmp/cubecl.log | sed 's/^/lines with griddepcontrol in the compiled sources: /'
xz -c /tmp/cubecl.log > $OUT/cubecl_sources.log.xz
for m in 0 1; do
  INFERENCE_PIO_PDL=$m timeout 40 .gpu/bin/kernel_check launch 2>&1 | grep -i chain | sed "s/^/dependent launch $m: /" | tee -a $OUT/launch.txt
done
for m in 0 1 0 1; do INFERENCE_PIO_PDL=$m bench_4b_decode 1 "dependent launch $m"; done
echo "4B done at $SECONDS s"
vl_tiny_one_image vl-tiny-a f32 | tee -a $OUT/decode.txt
for m in 0 1; do INFERENCE_PIO_PDL=$m vl_2b_decode_after_image "dependent launch $m"; done
echo "all done at $SECONDS s"
