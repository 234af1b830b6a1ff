#!/usr/bin/env bash
# One device call: GPU parity on the tiny fixtures (f32 and bf16), then Qwen3-4B shapes with
# random bf16 weights, inference-pio side by side with transformers eager.
# Expects .gpu/inference-pio.xz and .gpu/libqwen3_4b_instruct_2507.so.xz (carried).
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
FIX=plugins/qwen3-4b-instruct-2507/tests/fixtures
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
$PIO plugins list --plugin-dir .gpu/bin
PHASE=${1:-all}
[ "$PHASE" = "4b" ] && MODELS="" || MODELS="qwen3-tiny-b qwen3-tiny-c"
for m in $MODELS; do gpu_parity $FIX $m f32 bf16; done
# Qwen3-4B shapes, random weights.
CK=/tmp/qwen3-4b-random
time python3 benches/peers/transformers_qwen3.py --device cuda --make-checkpoint $CK --config plugins/qwen3-4b-instruct-2507/primary/config.json --tokenizer-dir $FIX/qwen3-tokenizer
IDS=$(python3 -c "print(','.join(str(1000 + (i * 7919) % 20000) for i in range(128)))")
# inference-pio first (bounded, so the peer still runs), streaming: its stderr summary line
# carries time to first token and decode tok/s.
start=$(date +%s)
timeout 400 $PIO run --plugin-dir .gpu/bin --model $CK --prompt-ids "$IDS" --device cuda --dtype bf16 --greedy --max-new-tokens 32 > $OUT/pio_stream.txt 2> $OUT/pio_stderr.txt
echo "inference-pio exit $? after $(( $(date +%s) - start )) s"; tail -3 $OUT/pio_stderr.txt
python3 benches/peers/transformers_qwen3.py --device cuda --model $CK --prompt-tokens 128 --new-tokens 32 --out $OUT/peer_eager.json
