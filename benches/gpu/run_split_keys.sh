#!/usr/bin/env bash
# One device call (issue 20): two small kernels' shapes. The fewest keys one split of the decode
# attention covers (INFERENCE_PIO_SPLIT_MIN_KEYS: 64, the default, 32 or 16): at batch 1
# Qwen3-4B's 8 key heads over a few hundred keys give 24-48 cubes of about 11 µs,
# latency-bound; more splits give more cubes with shorter chains. And the planes of the
# normalisations' one cube a row (INFERENCE_PIO_NORM_PLANES: 8, the default, 16 or 32): a
# 2,560-wide bf16 row is 320 vectors, two passes of 256 units each way. Qwen3-4B (real config,
# random bf16 weights, pio-bench, 128-token prompt, 256 new) steady decode at batch 1
# alternating, batch 8 at 64 and 32 keys, Qwen3-VL-2B after a 448x448 image at 64 and 32 keys,
# the tiny Qwen3 fixture in f32 at 16 keys and 32 planes.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,libqwen3_vl_2b.so,
# qwen3-tokenizer.json}.xz and .gpu/COMMIT; the tree holds
# plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
bench() { # KEYS ROWS [NORM_PLANES]
  INFERENCE_PIO_NORM_PLANES=${3:-8} INFERENCE_PIO_SPLIT_MIN_KEYS=$1 bench_4b_decode $2 "split min keys $1, norm planes ${3:-8}"
}
for v in "64 1" "32 1" "16 1" "64 1 16" "64 1 32" "64 1" "32 1" "64 1 16"; do bench $v; done
for k in 64 32; do bench $k 8; done
echo "4B done at $SECONDS s"
INFERENCE_PIO_NORM_PLANES=32 INFERENCE_PIO_SPLIT_MIN_KEYS=16 gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 2>&1 | tail -2
for k in 64 32; do INFERENCE_PIO_SPLIT_MIN_KEYS=$k vl_2b_decode_after_image "split min keys $k"; done
echo "all done at $SECONDS s"
