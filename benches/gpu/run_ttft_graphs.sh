#!/usr/bin/env bash
# One device call: where a long prompt's time to first token goes on CUDA. Qwen3-4B's real
# config, random bf16 weights, a 2,000-token prompt, batch 1, 3 runs in one process each:
# 1 new token (the prefill alone), 256 new tokens with recorded decode steps (the first decode
# step of a new width records a CUDA graph), and 256 new tokens with every step queued from
# the host (`cuda_graphs = false`).
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so}.xz.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
CK=$(qwen3_4b_dir)
: > /tmp/graphs.toml
printf '[plugins.qwen3-4b-instruct-2507]\ncuda_graphs = false\n' > /tmp/nographs.toml
for c in "graphs 1" "graphs 256" "nographs 256"; do
  set -- $c
  timeout 150 .gpu/bin/pio-bench --host $PIO --config /tmp/$1.toml --model $CK --random-weights --prompt-tokens 2000 --new-tokens $2 \
    --batch 1 --runs 3 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" --out $OUT/pio_$1_$2.json 2> $OUT/pio_$1_$2_stderr.txt
  echo "$1 $2: exit $?"
  python3 -c "import json; d=json.load(open('$OUT/pio_$1_$2.json')); print({k: d.get(k) for k in ['median_time_to_first_token_s','cold_time_to_first_token_s','median_prefill_tokens_per_s','median_steady_decode_tokens_per_s']})" || tail -3 $OUT/pio_$1_$2_stderr.txt
done
echo "script used $SECONDS s"
