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
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
bench() { # PLANES ROWS
  rm -f /tmp/pio.json
  INFERENCE_PIO_MATVEC_PLANES=$1 timeout 60 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
    --batch $2 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT)" --out /tmp/pio.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
  python3 -c "import json; d=json.load(open('/tmp/pio.json')); print('4B batch $2, planes $1: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1 | tee -a $OUT/decode.txt
}
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
qwen3_vl_2b_dir /tmp/vl2b
python3 -c "
import numpy as np
from PIL import Image
rng = np.random.RandomState(0); side = 448
y, x = np.mgrid[0:side, 0:side]
img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side) % 256], -1) + rng.randint(0, 16, (side, side, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save('/tmp/img448.png')"
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
for p in 8 $best 8 $best; do
  INFERENCE_PIO_MATVEC_PLANES=$p timeout 60 $PIO run $PD --config /tmp/vl.toml --model /tmp/vl2b --random-weights --image /tmp/img448.png \
    --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 2 > /tmp/vl.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
  python3 -c "
import json; d = json.load(open('/tmp/vl.json')); t = d['timings']
print('2B after a 448 image, planes $p: decode', round(t['decode_tokens_per_s'], 1), 'steady', round(t.get('steady_decode_tokens_per_s') or 0, 1), 'tok/s; first8', d['token_ids'][:8])" 2>&1 | tail -1 | tee -a $OUT/decode.txt
done
echo "all done at $SECONDS s"
