#!/usr/bin/env bash
# The matrix-vector kernel's masked tail, division-free index and early weight loads, measured
# (issue 20): kernel_check matvec with the kernel as before (INFERENCE_PIO_MATVEC_LEGACY=1) and
# as now, also on split weights (INFERENCE_PIO_CUBLAS=0); the tiny Qwen3 fixture's parity on
# CUDA; Qwen3-4B batch 1 and 2 and Qwen3-VL-2B after an image, before / now / 8 loads / no early
# loads, alternating. Carried: .gpu/{inference-pio,pio-bench,kernel_check,libqwen3_4b_instruct_2507.so,
# libqwen3_vl_2b.so,qwen3-tokenizer.json}.xz and .gpu/COMMIT.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio pio-bench kernel_check libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so
ensure_cublas > /dev/null
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
part=${1:-1}  # 1: kernel_check, parity, 4B round 1; 2: 4B round 2, batch 2, the VL model
if [ "$part" = 1 ]; then
for v in "LEGACY=1" "LEGACY=0"; do
  echo "== kernel_check matvec, INFERENCE_PIO_MATVEC_$v" | tee -a $OUT/kernel_check.txt
  env INFERENCE_PIO_MATVEC_$v timeout 150 .gpu/bin/kernel_check matvec 2>&1 | tee -a $OUT/kernel_check.txt | grep -E "FAIL|q/k/v 2560->6144|down|19456  |head" | grep -v "32 rows\|8 rows"
done
echo "== kernel_check matvec, split weights (no cuBLAS)" | tee -a $OUT/kernel_check.txt
INFERENCE_PIO_CUBLAS=0 timeout 150 .gpu/bin/kernel_check matvec 2>&1 | tee -a $OUT/kernel_check.txt | grep -cE " ok " ; grep -c FAIL $OUT/kernel_check.txt
gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 bf16 2>&1 | grep -E "worst|identical: False"
echo "parity done at $SECONDS s"
fi
for r in $part; do
  for v in LEGACY=1 LEGACY=0 LOADS=8 EARLY=0; do env INFERENCE_PIO_MATVEC_$v bash -c "source benches/gpu/lib.sh; bench_4b_decode 1 '$v round $r'"; done
done
[ "$part" = 2 ] || { echo "all done at $SECONDS s"; exit 0; }
for v in LEGACY=1 LEGACY=0; do env INFERENCE_PIO_MATVEC_$v bash -c "source benches/gpu/lib.sh; bench_4b_decode 2 '$v'"; done
for v in LEGACY=1 LEGACY=0; do env INFERENCE_PIO_MATVEC_$v bash -c "source benches/gpu/lib.sh; vl_2b_decode_after_image '$v'"; done
echo "all done at $SECONDS s"
