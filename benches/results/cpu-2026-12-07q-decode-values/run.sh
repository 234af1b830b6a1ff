#!/usr/bin/env bash
# CPU decode with the decode attention's weighted values summed in AVX-512 registers ("now")
# against the plugins built without it (BEFORE: a directory with their libllama.so and
# libqwen3_coder_30b.so, put first with --plugin-dir) and llama.cpp (llama-bench -t 2 -n N),
# alternating, ROUNDS rounds, 2 threads: SmolLM2-135M Q4_1 (the README's built-in model) and the
# small Qwen3-MoE Q4_0, 32 prompt tokens and 512 new. One JSON line per measurement on stdout.
set -euo pipefail
MOE=${MOE:-/tmp/moe-small/qwen3moe-small-Q4_0.gguf}
SMOL=${SMOL:-$HOME/.cache/inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
BEFORE=${BEFORE:-/tmp/dec_before}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/llama.cpp/build/bin}
ROUNDS=${ROUNDS:-3}
P32=$(python3 -c 'print(",".join(str(i*7+11) for i in range(32)))')
ours() { # FILE CASE BUILD [PLUGIN_DIR]
  ./target/debug/inference-pio run ${4:+--plugin-dir $4} --threads 2 --model "$1" --prompt-ids "$P32" --max-new-tokens 512 --ignore-eos --greedy --device cpu --json 2>/dev/null |
    python3 -c "import json,sys,hashlib; d=json.load(sys.stdin); print(json.dumps({'engine': 'inference-pio', 'build': '$3', 'case': '$2', 'tok_s': round(d['timings']['decode_tokens_per_s'], 1), 'tokens_md5': hashlib.md5(str(d['token_ids']).encode()).hexdigest()[:12]}))"
}
peer() { # FILE CASE
  "$LLAMA_BIN/llama-bench" -m "$1" -t 2 -p 0 -n 512 -r 1 -o json 2>/dev/null |
    python3 -c "import json,sys; print(json.dumps({'engine': 'llama.cpp', 'case': '$2', 'tok_s': round(json.load(sys.stdin)[0]['avg_ts'], 1)}))"
}
for r in $(seq "$ROUNDS"); do
  for c in "$SMOL smollm2" "$MOE moe-small"; do
    set -- $c
    ours "$1" "$2" now
    ours "$1" "$2" before "$BEFORE"
    peer "$1" "$2"
  done
done
