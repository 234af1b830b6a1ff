#!/usr/bin/env bash
# One device call: GPU parity on the tiny fixtures (f32 and bf16), then Qwen3-4B shapes with
# random bf16 weights, inference-pio side by side with transformers eager.
# Expects .gpu/inference-pio.xz and .gpu/libqwen3_4b_instruct_2507.so.xz (carried).
set -uo pipefail
mkdir -p .gpu/bin && xz -dc .gpu/inference-pio.xz > .gpu/bin/inference-pio && xz -dc .gpu/libqwen3_4b_instruct_2507.so.xz > .gpu/bin/libqwen3_4b_instruct_2507.so
chmod +x .gpu/bin/inference-pio
PIO=.gpu/bin/inference-pio
FIX=plugins/qwen3-4b-instruct-2507/tests/fixtures
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
$PIO plugins list --plugin-dir .gpu/bin
PHASE=${1:-all}
[ "$PHASE" = "4b" ] && MODELS="" || MODELS="qwen3-tiny-b qwen3-tiny-c"
for m in $MODELS; do
  for dt in f32 bf16; do
    python3 - "$FIX/$m.reference.json" > /tmp/prompts.txt <<'PY'
import json,sys
for p in json.load(open(sys.argv[1]))["prompts"]: print(",".join(map(str,p["ids"])))
PY
    i=0
    while read -r ids; do
      $PIO score --plugin-dir .gpu/bin --model $FIX/$m --prompt-ids "$ids" --json --device cuda --dtype $dt > /tmp/score.$m.$dt.json.$i 2>/tmp/err.txt || cat /tmp/err.txt
      $PIO run --plugin-dir .gpu/bin --model $FIX/$m --prompt-ids "$ids" --json --device cuda --dtype $dt --greedy --max-new-tokens 16 > /tmp/run.$m.$dt.json.$i 2>/tmp/err.txt || cat /tmp/err.txt
      i=$((i+1))
    done < /tmp/prompts.txt
    echo "== $m $dt"; python3 benches/gpu/parity_check.py $FIX/$m.reference.json /tmp/score.$m.$dt.json $dt /tmp/run.$m.$dt.json 2>&1 | tee -a $OUT/parity.txt
  done
done
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
