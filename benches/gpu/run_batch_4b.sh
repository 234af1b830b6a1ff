#!/usr/bin/env bash
# One device call: Qwen3-4B (its real config.json, random bf16 weights) through pio-bench at the
# issue's shapes — decode at batch 1, 8 and 32 (prompt 128, 64 new tokens) and prefill of 512 and
# 2,048 tokens, each process running the request more than once (the first run cold, the rest
# warm), peak GPU memory sampled through NVML — then transformers on the same shapes in the same
# call (eager: prefill 512/2048, decode batch 1/8/32; static cache + compile: batch 1), then
# CubeCL's per-kernel profile of eager 4B decode steps (benches/gpu/profile_4b_eager.sh).
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so}.xz, .gpu/COMMIT (the commit
# they were built from, `git describe --always --dirty`; the device's copy of the repository
# may not know it), and optionally
# .gpu/kernel_check.xz (then its checks and timings run first, including the fused projections).
# Writes $OUT/{device.txt,kernel_check.txt,parity.txt,pio_*.json,pio_*_stderr.txt,peer_*.json,
# profile/}.
# Env: BUDGET (s), CASES (default "b1 b8 b32 p512 p2048"), PEERS (default "eager static"; empty: none),
# PROFILE (1: run the profile at the end, default 1), PARITY (1: the tiny fixture's parity
# first, default 1), KERNEL_CHECK (arguments for kernel_check, e.g. "elementwise"; "none" skips it),
# KERNEL_CHECK_TIMEOUT (s, default 150).
set -uo pipefail
BUDGET=${BUDGET:-575}
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so
export XDG_CACHE_HOME=/tmp/xdg
ensure_cublas
# pio-bench starts the host as a user would; the host finds the plugin through this variable.
export INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
if [ -f .gpu/kernel_check.xz ] && [ "${KERNEL_CHECK:-}" != none ]; then
  unpack_gpu_binaries kernel_check
  timeout ${KERNEL_CHECK_TIMEOUT:-150} .gpu/bin/kernel_check ${KERNEL_CHECK:-} > $OUT/kernel_check.txt 2>&1; echo "kernel_check exit $?"
  grep -E "fused|cublas|softmax|FAIL|checks" $OUT/kernel_check.txt
fi
P=plugins/qwen3-4b-instruct-2507
# The tiny Qwen3 fixture through the CLI on CUDA against the committed transformers reference
# (f32 and bf16), so the kernels in the decoder are checked end to end before they are timed.
if [ "${PARITY:-1}" = 1 ]; then
  gpu_parity $P/tests/fixtures qwen3-tiny-b f32 bf16
  echo "parity phase done at $SECONDS s"
fi
CK=/tmp/m4b
mkdir -p $CK
cp $P/primary/config.json $CK/
cp -L $P/tests/fixtures/qwen3-tokenizer/tokenizer.json $P/tests/fixtures/qwen3-tokenizer/tokenizer_config.json $CK/
bench() { # name prompt_tokens new_tokens batch runs processes
  local left=$(( BUDGET - SECONDS - 200 ))
  [ $left -lt 30 ] && { echo "no time left for $1"; return; }
  local start=$SECONDS
  timeout $left .gpu/bin/pio-bench --host $PIO --model $CK --random-weights --prompt-tokens $2 --new-tokens $3 \
    --batch $4 --runs $5 --processes $6 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT 2>/dev/null || git rev-parse --short HEAD)" \
    --out $OUT/pio_$1.json 2> $OUT/pio_$1_stderr.txt
  echo "pio-bench $1: exit $? after $(( SECONDS - start )) s"
  python3 - $OUT/pio_$1.json <<'PY' 2>/dev/null || tail -3 $OUT/pio_$1_stderr.txt
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["batch", "prompt_tokens", "median_prefill_tokens_per_s", "median_steady_decode_tokens_per_s",
        "median_time_to_first_token_s", "cold_time_to_first_token_s", "second_process_time_to_first_token_s", "peak_gpu_mib"]
print(json.dumps({k: d.get(k) for k in keys}))
PY
}
for c in ${CASES:-b1 b8 b32 p512 p2048}; do
  case $c in
    b1) bench b1 128 64 1 2 2 ;;
    b8) bench b8 128 64 8 2 1 ;;
    b32) bench b32 128 64 32 2 1 ;;
    p512) bench p512 512 2 1 3 1 ;;
    p2048) bench p2048 2048 2 1 3 1 ;;
  esac
done
for mode in ${PEERS-eager static}; do
  left=$(( BUDGET - SECONDS - ( ${PROFILE:-1} == 1 ? 150 : 0 ) ))
  [ $left -lt 60 ] && { echo "no time left for the $mode peer"; break; }
  batches=""; [ $mode = eager ] && batches="--batches 8 32"
  timeout $(( left - 5 )) python3 benches/peers/transformers_moe.py --mode $mode --config $P/primary/config.json \
    --prompt-tokens 128 512 2048 $batches --new-tokens 32 --out $OUT/peer_$mode.json 2>&1 | tail -4
done
if [ "${PROFILE:-1}" = 1 ] && [ $(( BUDGET - SECONDS )) -gt 100 ]; then
  mkdir -p $OUT/profile
  OUT=$OUT/profile bash benches/gpu/profile_4b_eager.sh 2>&1 | head -40
fi
echo "script used $SECONDS s"
