#!/usr/bin/env bash
# The small Qwen3-MoE Q4_0 file (benches/cpu/make_qwen3moe_small_gguf.py --types Q4_0) at 1 and 2
# threads, ours (`run --threads N`, 32 prompt tokens, 128 new, default exact activations) and
# llama.cpp's CPU build (`llama-bench -t N -p 32 -n 128 -r 2`), alternating over ROUNDS rounds.
# Prints one JSON object. Run from the repository root after `cargo build`.
set -euo pipefail
GGUF=${GGUF:-/tmp/moe/qwen3moe-small-Q4_0.gguf}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/build/bin}
IDS=$(python3 -c "print(','.join(str(100 + i) for i in range(32)))")
for r in $(seq ${ROUNDS:-2}); do
  for t in 1 2; do
    ./target/debug/inference-pio run --threads $t --model "$GGUF" --prompt-ids "$IDS" --greedy --ignore-eos --max-new-tokens 128 --json 2>/dev/null \
      | python3 -c "import json,sys; t=json.load(sys.stdin)['timings']; print(json.dumps({'engine':'ours','threads':$t,'round':$r,'prefill':t['prefill_tokens_per_s'],'decode':t['decode_tokens_per_s']}))"
    LD_LIBRARY_PATH=$LLAMA_BIN $LLAMA_BIN/llama-bench -m "$GGUF" -t $t -p 32 -n 128 -r 2 -o json 2>/dev/null \
      | python3 -c "import json,sys; d=json.load(sys.stdin); v={x['n_prompt'] and 'prefill' or 'decode': x['avg_ts'] for x in d}; print(json.dumps({'engine':'llama.cpp','threads':$t,'round':$r,**v}))"
  done
done
