#!/usr/bin/env bash
# The small Qwen3-MoE Q4_0 file against llama.cpp on the same cores, alternating, ROUNDS rounds
# (issue 26): decode (32 prompt tokens + 256 new; llama-bench tg256) at 1 and 2 threads, and
# prefill of 256 and 2,048 tokens (llama-bench pp256 / pp2048) at 2 threads. One JSON line per
# measurement on stdout.
# MOE: benches/cpu/make_qwen3moe_small_gguf.py --types Q4_0; LLAMA_BIN: a CPU build of llama.cpp.
set -euo pipefail
MOE=${MOE:-/tmp/moe/qwen3moe-small-Q4_0.gguf}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/build/bin}
ROUNDS=${ROUNDS:-2}
ids() { python3 -c "print(','.join(str((i * $2) % $3 + 11) for i in range($1)))"; }
P32=$(python3 -c 'print(",".join(str(i*7+11) for i in range(32)))')
ours() { # NAME THREADS IDS NEW FIELD
  ./target/debug/inference-pio run --threads "$2" --model "$MOE" --prompt-ids "$3" --max-new-tokens "$4" --ignore-eos --greedy --device cpu --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'engine': 'inference-pio', 'case': '$1', 'threads': $2, 'tok_s': round(d['timings']['$5'], 1)}))"
}
peer() { # NAME THREADS ARGS...
  local name=$1 t=$2; shift 2
  "$LLAMA_BIN/llama-bench" -m "$MOE" -t "$t" "$@" -r 1 -o json 2>/dev/null |
    python3 -c "import json,sys; print(json.dumps({'engine': 'llama.cpp', 'case': '$name', 'threads': $t, 'tok_s': round(json.load(sys.stdin)[0]['avg_ts'], 1)}))"
}
for r in $(seq "$ROUNDS"); do
  for t in 1 2; do
    ours decode "$t" "$P32" 256 decode_tokens_per_s; peer decode "$t" -p 0 -n 256
  done
  for n in 256 2048; do
    ours "prefill$n" 2 "$(ids $n 7919 32000)" 1 prefill_tokens_per_s; peer "prefill$n" 2 -p $n -n 0
  done
done
