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
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
bench() { # KEYS ROWS [NORM_PLANES]
  rm -f /tmp/pio.json
  INFERENCE_PIO_NORM_PLANES=${3:-8} INFERENCE_PIO_SPLIT_MIN_KEYS=$1 timeout 60 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
    --batch $2 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT)" --out /tmp/pio.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
  python3 -c "import json; d=json.load(open('/tmp/pio.json')); print('4B batch $2, split min keys $1, norm planes ${3:-8}: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1 | tee -a $OUT/decode.txt
}
for v in "64 1" "32 1" "16 1" "64 1 16" "64 1 32" "64 1" "32 1" "64 1 16"; do bench $v; done
for k in 64 32; do bench $k 8; done
echo "4B done at $SECONDS s"
INFERENCE_PIO_NORM_PLANES=32 INFERENCE_PIO_SPLIT_MIN_KEYS=16 gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 2>&1 | tail -2
qwen3_vl_2b_dir /tmp/vl2b
python3 -c "
import numpy as np
from PIL import Image
rng = np.random.RandomState(0); side = 448
y, x = np.mgrid[0:side, 0:side]
img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side) % 256], -1) + rng.randint(0, 16, (side, side, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save('/tmp/img448.png')"
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
for k in 64 32; do
  rm -f /tmp/vl.json
  INFERENCE_PIO_SPLIT_MIN_KEYS=$k timeout 60 $PIO run $PD --config /tmp/vl.toml --model /tmp/vl2b --random-weights --image /tmp/img448.png \
    --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 2 > /tmp/vl.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
  python3 -c "
import json; d = json.load(open('/tmp/vl.json')); t = d['timings']
print('2B after a 448 image, split min keys $k: decode', round(t['decode_tokens_per_s'], 1), 'steady', round(t.get('steady_decode_tokens_per_s') or 0, 1), 'tok/s; first8', d['token_ids'][:8])" 2>&1 | tail -1 | tee -a $OUT/decode.txt
done
echo "all done at $SECONDS s"
