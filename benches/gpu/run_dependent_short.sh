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
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
for m in 0 1 0 1; do
  INFERENCE_PIO_PDL=$m timeout 60 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
    --batch 1 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT)" --out /tmp/pio.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
  python3 -c "import json; d=json.load(open('/tmp/pio.json')); print('4B batch 1, dependent launch $m: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1 | tee -a $OUT/decode.txt
done
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
for m in 0 1; do
  INFERENCE_PIO_PDL=$m timeout 60 $PIO run $PD --config /tmp/vl.toml --model /tmp/vl2b --random-weights --image /tmp/img448.png \
    --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 2 > /tmp/vl.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
  python3 -c "
import json; d = json.load(open('/tmp/vl.json')); t = d['timings']
print('2B after a 448 image, dependent launch $m: decode', round(t['decode_tokens_per_s'], 1), 'steady', round(t.get('steady_decode_tokens_per_s') or 0, 1), 'tok/s; first8', d['token_ids'][:8])" 2>&1 | tail -1 | tee -a $OUT/decode.txt
done
echo "all done at $SECONDS s"
