#!/usr/bin/env bash
# A short device call after run_dependent_short.sh: the tiny Qwen3 fixture in bf16 with the keys
# and values written in the rotation's kernel and dependent launches on, then off; Qwen3-4B
# (real config, random bf16 weights) batch 1 and 8 decode with dependent launches, with and
# without the rotation's write, batch 8 plain; the tiny VL fixture in bf16 with both on; the
# 2B's decode after a 448 image off/on. Carried: .gpu/{inference-pio,pio-bench,
# libqwen3_4b_instruct_2507.so,libqwen3_vl_2b.so,qwen3-tokenizer.json}.xz and .gpu/COMMIT.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer > /dev/null 2>&1
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so libqwen3_vl_2b.so > /dev/null 2>&1
ensure_cublas > /dev/null 2>&1
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
F=plugins/qwen3-4b-instruct-2507/tests/fixtures
INFERENCE_PIO_KV_IN_ROTATION=1 INFERENCE_PIO_PDL=1 gpu_parity $F qwen3-tiny-b bf16 2>&1 | tail -1 | sed 's/^/both on: /'
gpu_parity $F qwen3-tiny-b bf16 2>&1 | tail -1 | sed 's/^/both off: /'
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
for r in 1 2; do
  for v in 0:1:1 1:1:1 0:1:8 1:1:8 0:0:8; do
    IFS=: read k p b <<< "$v"
    INFERENCE_PIO_KV_IN_ROTATION=$k INFERENCE_PIO_PDL=$p timeout 60 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
      --batch $b --runs 2 --processes 1 --device cuda --dtype bf16 --machine H100 --commit "$(cat .gpu/COMMIT)" --out /tmp/p.json 2> /tmp/pio.err || tail -2 /tmp/pio.err
    python3 -c "import json; d=json.load(open('/tmp/p.json')); print('r$r kv $k pdl $p batch $b: steady', round(d['median_steady_decode_tokens_per_s'], 1))" | tee -a $OUT/split.txt
  done
done
echo "4B done at $SECONDS s"
INFERENCE_PIO_KV_IN_ROTATION=1 INFERENCE_PIO_PDL=1 vl_tiny_one_image vl-tiny-a bf16
qwen3_vl_2b_dir /tmp/vl2b
python3 -c "
from PIL import Image; import numpy as np
Image.fromarray((np.random.RandomState(0).rand(448, 448, 3) * 255).astype(np.uint8)).save('/tmp/i.png')"
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
for v in 0:0 1:1 0:0 1:1; do
  IFS=: read k p <<< "$v"
  INFERENCE_PIO_KV_IN_ROTATION=$k INFERENCE_PIO_PDL=$p timeout 60 $PIO run $PD --config /tmp/vl.toml --model /tmp/vl2b --random-weights --image /tmp/i.png --prompt "Describe this image." \
    --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 2 > /tmp/vl.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
  python3 -c "import json; d=json.load(open('/tmp/vl.json')); t=d['timings']; print('2B kv $k pdl $p: steady', round(t.get('steady_decode_tokens_per_s') or 0, 1), d['token_ids'][:6])" | tee -a $OUT/split.txt
done
echo "all done at $SECONDS s"
