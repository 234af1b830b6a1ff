#!/usr/bin/env bash
# The small Qwen3-MoE Q4_0 file's prompt experts on host vectors (one task per expert) against
# the same engine before (BEFORE: a plugin directory holding the previous libqwen3_coder_30b.so,
# put first with --plugin-dir) and llama.cpp, alternating, ROUNDS rounds, 2 threads: prefill of
# 256 and 2,048 tokens, and decode (32 + 256 tokens), whose path is restructured too.
# One JSON line per measurement on stdout.
set -euo pipefail
MOE=${MOE:-/tmp/moe-small/qwen3moe-small-Q4_0.gguf}
BEFORE=${BEFORE:-/tmp/moe_before}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/llama.cpp/build/bin}
ROUNDS=${ROUNDS:-3}
ids() { python3 -c "print(','.join(str((i * 7919) % 32000 + 11) for i in range($1)))"; }
P32=$(python3 -c 'print(",".join(str(i*7+11) for i in range(32)))')
ours() { # LABEL CASE IDS NEW FIELD [PLUGIN_DIR]
  ./target/debug/inference-pio run ${6:+--plugin-dir $6} --threads 2 --model "$MOE" --prompt-ids "$3" --max-new-tokens "$4" --ignore-eos --greedy --device cpu --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'engine': 'inference-pio', 'build': '$1', 'case': '$2', 'tok_s': round(d['timings']['$5'], 1), 'tokens_md5': __import__('hashlib').md5(str(d['token_ids']).encode()).hexdigest()[:12]}))"
}
peer() { # CASE ARGS...
  local name=$1; shift
  "$LLAMA_BIN/llama-bench" -m "$MOE" -t 2 "$@" -r 1 -o json 2>/dev/null |
    python3 -c "import json,sys; print(json.dumps({'engine': 'llama.cpp', 'case': '$name', 'tok_s': round(json.load(sys.stdin)[0]['avg_ts'], 1)}))"
}
for r in $(seq "$ROUNDS"); do
  for n in 256 2048; do
    ours now "prefill$n" "$(ids $n)" 1 prefill_tokens_per_s
    ours before "prefill$n" "$(ids $n)" 1 prefill_tokens_per_s "$BEFORE"
    peer "prefill$n" -p $n -n 0
  done
  ours now decode "$P32" 256 decode_tokens_per_s
  ours before decode "$P32" 256 decode_tokens_per_s "$BEFORE"
  peer decode -p 0 -n 256
done
