#!/usr/bin/env bash
# One device call: batch-1 decode with the step captured as a CUDA graph (`cuda_graphs = true`,
# the default) against the eager step (`cuda_graphs = false`), on a real config.json with
# random bf16 weights (--random-weights, the same seed, so the greedy tokens must be equal);
# then transformers on the same shapes in the same call (eager, then static cache + compile).
# First the model's tiny fixtures through the CLI on CUDA against the committed transformers
# references (the captured path on the GPU, f32 and bf16).
# Usage: run_decode_graphs.sh 4b|30b. Carried: .gpu/inference-pio.xz and the plugin's .so.xz.
# Writes $OUT/{device.txt,parity.txt,pio_*.json,pio_*_stderr.txt,peer_*.json,summary.json}.
# Env: BUDGET (s for this script), TINY_DTYPES (default "f32 bf16"), WARM (1: a second,
# warm-cache run with graphs), PEERS (default "eager static"), NEW_TOKENS, PROMPT,
# TINY_MODELS (the fixtures checked; default all of the model's).
set -uo pipefail
BUDGET=${BUDGET:-570}
source benches/gpu/lib.sh
case ${1:-} in
  4b) ID=qwen3-4b-instruct-2507 SO=libqwen3_4b_instruct_2507.so P=plugins/qwen3-4b-instruct-2507
      TOK=$P/tests/fixtures/qwen3-tokenizer TINY="qwen3-tiny-b" ;;
  30b) ID=qwen3-coder-30b SO=libqwen3_coder_30b.so P=plugins/qwen3-coder-30b
       TOK=$P/tests/fixtures/qwen3-coder-tokenizer TINY="qwen3moe-tiny-a qwen3moe-tiny-b" ;;
  *) echo "usage: $0 4b|30b" >&2; exit 2 ;;
esac
TINY=${TINY_MODELS-$TINY}
unpack_gpu_binaries inference-pio $SO
export XDG_CACHE_HOME=/tmp/xdg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
for m in $TINY; do gpu_parity $P/tests/fixtures $m ${TINY_DTYPES:-f32 bf16}; done
echo "parity phase used $SECONDS s"
CK=/tmp/model-$1
mkdir -p $CK
cp $P/primary/config.json $CK/
cp -L $TOK/tokenizer.json $TOK/tokenizer_config.json $CK/
printf '[plugins.%s]\ncuda_graphs = false\n' $ID > /tmp/eager.toml
: > /tmp/none.toml
ids=$(python3 -c "print(','.join(str(1000 + (i * 7919) % 20000) for i in range(${PROMPT:-128})))")
pio() { # name config new_tokens timeout
  local start=$(date +%s)
  INFERENCE_PIO_LOG=1 timeout $4 $PIO --config $2 run $PD --model $CK --random-weights --prompt-ids "$ids" --device cuda --dtype bf16 --greedy --max-new-tokens $3 --json > $OUT/pio_$1.json 2> $OUT/pio_$1_stderr.txt
  echo "inference-pio $1: exit $? after $(( $(date +%s) - start )) s"
  grep -E "decode steps|recording|uncaptured|decode step (1|2|3|32|64):|error" $OUT/pio_$1_stderr.txt | tail -8
  python3 -c "import json; print(json.dumps(json.load(open('$OUT/pio_$1.json'))['timings']))" 2>/dev/null
}
NEW=${NEW_TOKENS:-64}
pio graphs /tmp/none.toml $NEW 240     # cold: kernels compiled into the cache
[ "${WARM:-1}" = 1 ] && pio graphs_warm /tmp/none.toml $NEW 120
pio eager /tmp/eager.toml $NEW 150
python3 - $OUT <<'PY' | tee $OUT/summary.json
import json, sys
out = sys.argv[1]
def load(n):
    try: return json.load(open(f"{out}/pio_{n}.json"))
    except Exception: return None
g, w, e = load("graphs"), load("graphs_warm"), load("eager")
print(json.dumps({
  "tokens_equal_graphs_vs_eager": bool(g and e and g["token_ids"] == e["token_ids"]),
  "tokens_equal_warm_vs_cold": bool(g and w and g["token_ids"] == w["token_ids"]),
  "graphs_cold": g and g["timings"], "graphs_warm": w and w["timings"], "eager": e and e["timings"],
}, indent=1))
PY
for mode in ${PEERS:-eager static}; do
  left=$(( BUDGET - SECONDS ))
  [ $left -lt 60 ] && { echo "no time left for the $mode peer"; break; }
  timeout $(( left - 10 )) python3 benches/peers/transformers_moe.py --mode $mode --config $P/primary/config.json --prompt-tokens ${PROMPT:-128} 2048 --new-tokens 32 --out $OUT/peer_$mode.json 2>&1 | tail -3
done
echo "script used $SECONDS s"
