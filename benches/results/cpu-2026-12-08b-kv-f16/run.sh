#!/usr/bin/env bash
# MODEL's decode (default the built-in SmolLM2-135M Q4_1) on the CPU after prompts of DEPTHS tokens
# (default "32 600 2000") of ids below VOCAB (default 49000), alternating, ROUNDS rounds (default 3),
# 2 threads, one JSON line per measurement:
#   - BASE (optional): a directory with an older build's `inference-pio` and plugin `.so` files
#     (this file's "before": 58d707b's target/debug), f32 KV pages;
#   - this tree's target/debug with f32 pages (`kv_cache_dtype` unset) and with f16 pages;
#   - llama.cpp's llama-bench tg128 at the same depth (-d; its default f16 KV cache).
#   PLUGIN: the plugin section the model's settings go to (default llama; the small Qwen3 file:
#   qwen3-4b-instruct-2507). LLAMA_BIN: a CPU build of llama.cpp (../shared/peers/build_llamacpp.sh --cpu).
set -euo pipefail
MODEL=${MODEL:-$HOME/.cache/inference-pio/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/llama.cpp/build/bin}
conf=$(mktemp -d)
: > "$conf/f32.toml"
printf '[plugins.%s]\nkv_cache_dtype = "f16"\n' "${PLUGIN:-llama}" > "$conf/f16.toml"
ids() { python3 -c "print(','.join(str((i * 7919) % ${VOCAB:-49000} + 11) for i in range($1)))"; }
ours() { # DEPTH BUILD BINDIR KV
  "$3/inference-pio" run --plugin-dir "$3" --config "$conf/$4.toml" --threads 2 --model "$MODEL" --prompt-ids "$(ids "$1")" --max-new-tokens 128 --ignore-eos --greedy --device cpu --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'engine': 'inference-pio', 'build': '$2', 'kv': d['model']['kv_cache_dtype'], 'depth': $1, 'tok_s': round(d['timings']['steady_decode_tokens_per_s'], 1), 'first_tokens': d['token_ids'][:8]}))"
}
peer() { # DEPTH
  "$LLAMA_BIN/llama-bench" -m "$MODEL" -t 2 -p 0 -n 128 -d "$1" -r 1 -o json 2>/dev/null |
    python3 -c "import json,sys; print(json.dumps({'engine': 'llama.cpp', 'kv': 'f16', 'depth': $1, 'tok_s': round(json.load(sys.stdin)[0]['avg_ts'], 1)}))"
}
for r in $(seq "${ROUNDS:-3}"); do
  for depth in ${DEPTHS:-32 600 2000}; do
    if [ -n "${BASE:-}" ]; then ours "$depth" before "$BASE" f32; fi
    ours "$depth" after target/debug f32
    ours "$depth" after target/debug f16
    peer "$depth"
  done
done
