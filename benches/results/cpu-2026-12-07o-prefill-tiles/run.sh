#!/usr/bin/env bash
# Prompt prefill on the CPU with the tiled attention (default) and the reference
# (INFERENCE_PIO_CPU_PREFILL_TILES=0) beside llama.cpp's llama-bench on the same cores,
# alternating, ROUNDS rounds, 2 threads; greedy first tokens printed for both of ours (issue 26).
# One JSON line per measurement on stdout.
#   MOE: benches/cpu/make_qwen3moe_small_gguf.py --types Q4_0
#   SMOL: the built-in SmolLM2-135M-Instruct.Q4_1.gguf (`inference-pio models fetch`)
#   QWEN: benches/cpu/make_qwen3_small_gguf.py --direct (Q4_1-pure)
#   LLAMA_BIN: a CPU build of llama.cpp (../shared/peers/build_llamacpp.sh --cpu)
set -euo pipefail
MOE=${MOE:-/tmp/moe-small/qwen3moe-small-Q4_0.gguf}
SMOL=${SMOL:-$HOME/.cache/inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
QWEN=${QWEN:-/tmp/qwen3-small-gguf/qwen3-small-Q4_1-pure.gguf}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/llama.cpp/build/bin}
ROUNDS=${ROUNDS:-3}
ids() { python3 -c "print(','.join(str((i * 7919) % $2 + 11) for i in range($1)))"; }
ours() { # FILE NAME TOKENS VOCAB SETTING
  ${5:+env $5} ./target/debug/inference-pio run --threads 2 --model "$1" --prompt-ids "$(ids $3 $4)" --max-new-tokens 1 --ignore-eos --greedy --device cpu --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'engine': 'inference-pio', 'attention': '${5:-tiles}', 'case': '$2', 'tokens': $3, 'tok_s': round(d['timings']['prefill_tokens_per_s'], 1), 'first_token': d['token_ids'][0]}))"
}
peer() { # FILE NAME TOKENS
  "$LLAMA_BIN/llama-bench" -m "$1" -t 2 -p "$3" -n 0 -r 1 -o json 2>/dev/null |
    python3 -c "import json,sys; print(json.dumps({'engine': 'llama.cpp', 'case': '$2', 'tokens': $3, 'tok_s': round(json.load(sys.stdin)[0]['avg_ts'], 1)}))"
}
for r in $(seq "$ROUNDS"); do
  for c in "$MOE moe-small 256 32000" "$MOE moe-small 2048 32000" "$SMOL smollm2 1500 49000" "$QWEN qwen3-small 512 150000"; do
    set -- $c
    ours "$1" "$2" "$3" "$4"
    ours "$1" "$2" "$3" "$4" INFERENCE_PIO_CPU_PREFILL_TILES=0
    peer "$1" "$2" "$3"
  done
done
