#!/usr/bin/env bash
# One device call (issue 20): the matrix-vector kernel's planes per cube
# (INFERENCE_PIO_MATVEC_PLANES: 2, 4, 8 (the default) or 16 output channels a cube). Qwen3-4B's
# o and down products have 2,560 channels: 320 cubes of 8 over 132 multiprocessors, two or
# three each, so some finish a third earlier than others; smaller cubes even that out.
# Runs kernel_check matvec at each, then Qwen3-4B (real config, random bf16 weights, pio-bench,
# 128-token prompt, 256 new) steady decode at batch 1 and 2 alternating, the tiny Qwen3 fixture
# in f32 at the best setting, and Qwen3-VL-2B's decode after a 448x448 image at 8 and the best.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,libqwen3_vl_2b.so,
# kernel_check,qwen3-tokenizer.json}.xz and .gpu/COMMIT; the tree holds
# plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so kernel_check
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
for p in 8 4 2 16; do
  INFERENCE_PIO_MATVEC_PLANES=$p timeout 60 .gpu/bin/kernel_check matvec > $OUT/kernel_check_$p.txt 2>&1
  echo "planes $p: exit $?"; grep -E "^4B (q/k/v-like|down|fused q/k/v|fused gate/up 2560|head).*BF16|SwiGLU.*BF16|checks" $OUT/kernel_check_$p.txt | sed "s/^/planes $p: /" | cut -c1-150
done
echo "kernel_check done at $SECONDS s"
bench() { INFERENCE_PIO_MATVEC_PLANES=$1 bench_4b_decode $2 "planes $1"; } # PLANES ROWS
for p in 8 4 2 16 8 4 2; do bench $p 1; done
for p in 8 4 2; do bench $p 2; done
echo "4B done at $SECONDS s"
best=$(python3 -c "
import re, collections
r = collections.defaultdict(list)
for l in open('$OUT/decode.txt'):
    m = re.match(r'4B batch 1, planes (\d+): steady decode ([\d.]+)', l)
    if m: r[m[1]].append(float(m[2]))
print(max(r, key=lambda p: sum(r[p]) / len(r[p])))")
echo "best at batch 1: $best planes"
INFERENCE_PIO_MATVEC_PLANES=$best gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 2>&1 | tail -2
for p in 8 $best 8 $best; do INFERENCE_PIO_MATVEC_PLANES=$p vl_2b_decode_after_image "planes $p"; done
echo "all done at $SECONDS s"
