#!/usr/bin/env bash
# Qwen3-Coder-30B-A3B (real config, all 48 layers, random bf16 weights) batch-1 decode with the
# decode attention's fewest keys a split (INFERENCE_PIO_SPLIT_MIN_KEYS) at each of KEYS (default
# "64 16 32 64 16"; `default`: the switch unset), through pio-bench (128-token
# prompt, 256 new, two runs a process); no run starts after BUDGET seconds. Issue 20: the model
# has 4 key heads, so at 128-384 keys the default split (64) gives the attention 8-24 cubes
# (Qwen3-4B's 8 key heads measured best at 64, benches/results/gpu-h100-2026-12-07l-small-kernel-shapes.md).
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_coder_30b.so,qwen3-tokenizer.json}.xz, .gpu/COMMIT.
set -uo pipefail
source benches/gpu/lib.sh
device_setup inference-pio pio-bench libqwen3_coder_30b.so
CK=$(qwen3_coder_30b_dir)
for keys in ${KEYS:-64 16 32 64 16}; do
  [ $SECONDS -lt ${BUDGET:-100000} ] || { echo "budget: keys $keys not run"; continue; }
  rm -f /tmp/p30.json
  env $([ "$keys" = default ] || echo INFERENCE_PIO_SPLIT_MIN_KEYS=$keys) timeout 240 .gpu/bin/pio-bench --host $PIO --model $CK --random-weights --prompt-tokens 128 \
    --new-tokens 256 --batch 1 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT)" --out /tmp/p30.json 2> /tmp/p30.err || tail -3 /tmp/p30.err
  cp /tmp/p30.json $OUT/keys$keys-at$SECONDS.json 2>/dev/null
  python3 -c "import json, sys; d = json.load(open('/tmp/p30.json')); print(f'30B batch 1, split min keys {sys.argv[1]}: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s at', sys.argv[2], 's')" \
    "$keys" "$SECONDS" 2>&1 | tail -1 | tee -a $OUT/decode.txt
done
