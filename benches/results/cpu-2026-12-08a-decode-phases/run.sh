#!/usr/bin/env bash
# MODEL's decode (default the built-in SmolLM2-135M Q4_1) on the CPU after prompts of DEPTHS tokens
# (default "32 600 2000") of ids below VOCAB (default 49000):
# ours with the three-phase decode attention (default), ours with the one-region tasks
# (INFERENCE_PIO_CPU_DECODE_PHASES=0), and llama.cpp's llama-bench tg128 at the same depth
# (-d), alternating, ROUNDS rounds (default 4), 2 threads. One JSON line per measurement.
#   MODEL: a GGUF file (default the built-in SmolLM2-135M-Instruct.Q4_1.gguf, `inference-pio models fetch`;
#   the small Qwen3 table: MODEL=/tmp/qwen3-small-gguf/qwen3-small-Q4_1-pure.gguf VOCAB=150000
#   DEPTHS="300 2000", the file from benches/cpu/make_qwen3_small_gguf.py --direct)
#   LLAMA_BIN: a CPU build of llama.cpp (../shared/peers/build_llamacpp.sh --cpu)
set -euo pipefail
SMOL=${MODEL:-$HOME/.cache/inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/llama.cpp/build/bin}
ids() { python3 -c "print(','.join(str((i * 7919) % ${VOCAB:-49000} + 11) for i in range($1)))"; }
ours() { # DEPTH SETTING
  ${2:+env $2} ./target/debug/inference-pio run --threads 2 --model "$SMOL" --prompt-ids "$(ids $1)" --max-new-tokens 128 --ignore-eos --greedy --device cpu --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'engine': 'inference-pio', 'attention': '${2:-phases}', 'depth': $1, 'tok_s': round(d['timings']['steady_decode_tokens_per_s'], 1), 'first_tokens': d['token_ids'][:8]}))"
}
peer() { # DEPTH
  "$LLAMA_BIN/llama-bench" -m "$SMOL" -t 2 -p 0 -n 128 -d "$1" -r 1 -o json 2>/dev/null |
    python3 -c "import json,sys; print(json.dumps({'engine': 'llama.cpp', 'depth': $1, 'tok_s': round(json.load(sys.stdin)[0]['avg_ts'], 1)}))"
}
for r in $(seq "${ROUNDS:-4}"); do
  for depth in ${DEPTHS:-32 600 2000}; do
    ours "$depth"
    ours "$depth" INFERENCE_PIO_CPU_DECODE_PHASES=0
    peer "$depth"
  done
done
