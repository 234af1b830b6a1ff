#!/usr/bin/env bash
# One device call: Qwen3-Coder-30B-A3B shapes with random bf16 weights (--random-weights, the
# real config.json), batch 1. inference-pio on a 128-token prompt (prefill + decode), then
# transformers eager on the same shapes and ids, then inference-pio on a 2,048-token prompt in a
# new process (kernels from the first run's cache). Same GPU, same call.
# Expects .gpu/inference-pio.xz and .gpu/libqwen3_coder_30b.so.xz (carried); writes $OUT/*.json.
# Env: PIO_TIMEOUT (s, first run), PEER_TIMEOUT, NEW_TOKENS, BUDGET (s for the whole script).
set -uo pipefail
BUDGET=${BUDGET:-570}
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_coder_30b.so
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_LOG=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
CK=$(qwen3_coder_30b_dir)
ids() { python3 -c "print(','.join(str(1000 + (i * 7919) % 20000) for i in range($1)))"; }
pio() { # name prompt_tokens new_tokens timeout
  local start=$(date +%s)
  timeout $4 $PIO run $PD --model $CK --random-weights --prompt-ids "$(ids $2)" --device cuda --dtype bf16 --greedy --max-new-tokens $3 --json > $OUT/pio_$1.json 2> $OUT/pio_$1_stderr.txt
  echo "inference-pio $1: exit $? after $(( $(date +%s) - start )) s"; grep -v "^ " $OUT/pio_$1_stderr.txt | tail -14
  python3 -c "import json; d=json.load(open('$OUT/pio_$1.json')); print(json.dumps(d['timings']))" 2>/dev/null
}
pio p128 128 ${NEW_TOKENS:-48} ${PIO_TIMEOUT:-300}
left=$(( BUDGET - SECONDS ))
timeout $(( left < ${PEER_TIMEOUT:-200} ? left - 5 : ${PEER_TIMEOUT:-200} )) python3 benches/peers/transformers_moe.py --config plugins/qwen3-coder-30b/primary/config.json --prompt-tokens 128 2048 --new-tokens 32 --out $OUT/peer_eager.json 2>&1 | tail -4
left=$(( BUDGET - SECONDS ))
[ $left -gt 40 ] && pio p2048 2048 4 $(( left - 10 ))
echo "script used $SECONDS s"
