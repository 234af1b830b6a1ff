#!/usr/bin/env bash
# One device call for the MoE plugins: GPU parity of the tiny Qwen3-MoE fixtures (f32), then
# Qwen3-Coder-30B-A3B shapes with random bf16 weights (--random-weights, real config.json),
# inference-pio first, transformers eager second, same GPU, same call.
# Expects .gpu/inference-pio.xz and .gpu/libqwen3_coder_30b.so.xz (carried).
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_coder_30b.so
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
# CUBECL_LOGS=1: CubeCL's compilation and autotune logs (kernel names, tuning results) into $OUT.
if [ -n "${CUBECL_LOGS:-}" ]; then
  printf '[compilation.logger]\nlevel = "basic"\nfile = "%s/cubecl-compile.log"\n[autotune.logger]\nlevel = "minimal"\nfile = "%s/cubecl-autotune.log"\n' "$OUT" "$OUT" > cubecl.toml
fi
# CubeCL's kernel and autotune cache (the host's cache dir + /cubecl) lives under .gpu/xdg, which
# the call carries in and returns as $OUT/xdg-cache.tar.xz: a later call starts warm.
export XDG_CACHE_HOME=$PWD/.gpu/xdg && mkdir -p $XDG_CACHE_HOME
[ -f .gpu/xdg-cache.tar.xz ] && tar -C .gpu -xJf .gpu/xdg-cache.tar.xz
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
FIX=plugins/qwen3-coder-30b/tests/fixtures
# PHASE=30b skips the tiny-fixture parity (each CLI start recompiles every kernel: ~100 s).
[ "${PHASE:-all}" = "30b" ] && MODELS="" || MODELS="qwen3moe-tiny-a qwen3moe-tiny-b"
for m in $MODELS; do gpu_parity $FIX $m f32; done
# Qwen3-Coder-30B-A3B, random weights on the device.
CK=$(qwen3_coder_30b_dir)
# The peer first, so a slow inference-pio start cannot crowd it out of the call.
[ -n "${SKIP_PEER:-}" ] || timeout ${PEER_TIMEOUT:-200} python3 benches/peers/transformers_moe.py --config plugins/qwen3-coder-30b/primary/config.json --prompt-tokens 128 2048 --new-tokens 32 --out $OUT/peer_qwen3_coder_30b_eager.json 2>&1 | tail -15
IDS=$(python3 -c "print(','.join(str(1000 + (i * 7919) % 20000) for i in range(128)))")
start=$(date +%s)
timeout ${PIO_TIMEOUT:-330} $PIO run $PD --model $CK --random-weights --prompt-ids "$IDS" --device cuda --dtype bf16 --greedy --max-new-tokens ${NEW_TOKENS:-48} --json > $OUT/pio_qwen3_coder_30b.json 2> $OUT/pio_stderr.txt
echo "inference-pio exit $? after $(( $(date +%s) - start )) s"; grep -v "^ " $OUT/pio_stderr.txt | tail -12
python3 -c "import json; d=json.load(open('$OUT/pio_qwen3_coder_30b.json')); print(json.dumps(d['timings']))" 2>/dev/null
# WARM=1: the same run again in a new process, to see what the kernel/autotune cache saves.
if [ -n "${WARM:-}" ]; then
  start=$(date +%s)
  timeout ${PIO_TIMEOUT:-330} $PIO run $PD --model $CK --random-weights --prompt-ids "$IDS" --device cuda --dtype bf16 --greedy --max-new-tokens ${NEW_TOKENS:-48} --json > $OUT/pio_qwen3_coder_30b_warm.json 2> $OUT/pio_stderr_warm.txt
  echo "inference-pio (warm) exit $? after $(( $(date +%s) - start )) s"; grep -v "^ " $OUT/pio_stderr_warm.txt | tail -12
  python3 -c "import json; d=json.load(open('$OUT/pio_qwen3_coder_30b_warm.json')); print(json.dumps(d['timings']))" 2>/dev/null
fi
du -sh .gpu/xdg 2>/dev/null; tar -C .gpu -cJf $OUT/xdg-cache.tar.xz xdg 2>/dev/null
