#!/usr/bin/env bash
# One device call for four launches fewer per decoder layer (issue 20): the SwiGLU gate in the
# [gate | up] product's kernel (INFERENCE_PIO_SWIGLU_IN_MATVEC, up to 2 rows), the split decode
# attention's merge in the attention kernel's last cube (INFERENCE_PIO_MERGE_IN_ATTENTION), and
# the residual add + RMSNorm after the o and down products in their kernels' last cube of each
# row (INFERENCE_PIO_NORM_IN_MATVEC, up to 2 rows); all on by default. Runs: kernel_check's
# matvec and attention groups (each fusion against the kernels it replaces: the same bits,
# timed), the tiny Qwen3 fixture in f32 and bf16 with all off and all on, Qwen3-4B (real config,
# random bf16 weights, pio-bench, 128-token prompt, 256 new) batch 1 in five variants, batch 2
# and 8 off / on, the tiny Qwen3-VL fixture's one-image prompt in f32, and Qwen3-VL-2B's decode
# after a 448x448 image off / on.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,libqwen3_vl_2b.so,
# kernel_check,qwen3-tokenizer.json}.xz and .gpu/COMMIT; the tree holds
# plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-b and plugins/qwen3-vl-2b/tests.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so kernel_check
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
# variant NAME: the three switches for NAME (none, swiglu, merge, norm: that one alone; all).
variant() {
  export INFERENCE_PIO_SWIGLU_IN_MATVEC=0 INFERENCE_PIO_MERGE_IN_ATTENTION=0 INFERENCE_PIO_NORM_IN_MATVEC=0
  case $1 in
    swiglu) export INFERENCE_PIO_SWIGLU_IN_MATVEC=1 ;;
    merge) export INFERENCE_PIO_MERGE_IN_ATTENTION=1 ;;
    norm) export INFERENCE_PIO_NORM_IN_MATVEC=1 ;;
    all) export INFERENCE_PIO_SWIGLU_IN_MATVEC=1 INFERENCE_PIO_MERGE_IN_ATTENTION=1 INFERENCE_PIO_NORM_IN_MATVEC=1 ;;
  esac
}
for v in none all; do
  for dt in f32 bf16; do
    echo "== variant $v" >> $OUT/parity.txt
    (variant $v; gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b $dt 2>&1 | tail -2 | sed "s/^/$v $dt: /")
  done
done
echo "parity done at $SECONDS s"
timeout 150 .gpu/bin/kernel_check matvec attention > $OUT/kernel_check.txt 2>&1; echo "kernel_check exit $?"
grep -E "SwiGLU|merged|add \+ norm|FAIL|checks" $OUT/kernel_check.txt | head -80
echo "kernel_check done at $SECONDS s"
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
bench() { # VARIANT ROWS
  (variant $1
  timeout 60 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
    --batch $2 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT)" --out /tmp/pio.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
  python3 -c "import json; d=json.load(open('/tmp/pio.json')); print('4B batch $2, $1: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1 | tee -a $OUT/decode.txt)
}
for v in none all swiglu merge norm all none; do bench $v 1; done
for v in none all; do bench $v 2; bench $v 8; done
echo "4B done at $SECONDS s"
vl_tiny_one_image vl-tiny-a f32 | tee -a $OUT/decode.txt
qwen3_vl_2b_dir /tmp/vl2b
python3 -c "
import numpy as np
from PIL import Image
rng = np.random.RandomState(0); side = 448
y, x = np.mgrid[0:side, 0:side]
img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side) % 256], -1) + rng.randint(0, 16, (side, side, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save('/tmp/img448.png')"
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
for v in none all; do
  (variant $v
  timeout 60 $PIO run $PD --config /tmp/vl.toml --model /tmp/vl2b --random-weights --image /tmp/img448.png \
    --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 2 > /tmp/vl.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
  python3 -c "
import json; d = json.load(open('/tmp/vl.json')); t = d['timings']
print('2B after a 448 image, $v: decode', round(t['decode_tokens_per_s'], 1), 'steady', round(t.get('steady_decode_tokens_per_s') or 0, 1), 'tok/s; first8', d['token_ids'][:8])" 2>&1 | tail -1 | tee -a $OUT/decode.txt)
done
echo "all done at $SECONDS s"
