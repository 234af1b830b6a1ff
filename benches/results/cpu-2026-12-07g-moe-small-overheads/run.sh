#!/usr/bin/env bash
# The small Qwen3-MoE Q4_0 file (benches/cpu/make_qwen3moe_small_gguf.py --types Q4_0) before and
# after this session's CPU changes, beside llama.cpp's CPU build, at 1 and 2 threads, alternating
# over ROUNDS rounds. Ours: `run --threads N` with the plugin directory BEFORE or AFTER (each
# holding libqwen3_coder_30b.so built at its commit): decode = 32 prompt tokens, 128 new; prefill =
# a 256-token prompt, 1 new. llama.cpp: `llama-bench -t N -p 32,256 -n 128 -r 2`.
# Writes runs.jsonl beside this script, then summary.py writes the .json and .png.
set -euo pipefail
here=$(dirname "$0")
GGUF=${GGUF:-/tmp/moe/qwen3moe-small-Q4_0.gguf}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llama-cpu/build/bin}
BEFORE=${BEFORE:-/tmp/pa} AFTER=${AFTER:-/tmp/pb}
P32=$(python3 -c "print(','.join(str(100 + i) for i in range(32)))")
P256=$(python3 -c "print(','.join(str(100 + i) for i in range(256)))")
: > "$here/runs.jsonl"
ours() {  # variant dir threads
  local d p
  d=$(INFERENCE_PIO_PLUGIN_DIR=$2 ./target/debug/inference-pio run --threads $3 --model "$GGUF" --prompt-ids "$P32" --greedy --ignore-eos --max-new-tokens 128 --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['decode_tokens_per_s'])")
  p=$(INFERENCE_PIO_PLUGIN_DIR=$2 ./target/debug/inference-pio run --threads $3 --model "$GGUF" --prompt-ids "$P256" --greedy --max-new-tokens 1 --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['prefill_tokens_per_s'])")
  echo "{\"engine\":\"$1\",\"threads\":$3,\"round\":$r,\"decode\":$d,\"prefill256\":$p}" | tee -a "$here/runs.jsonl"
}
for r in $(seq ${ROUNDS:-3}); do
  for t in 1 2; do
    ours before "$BEFORE" $t
    ours after "$AFTER" $t
    LD_LIBRARY_PATH=$LLAMA_BIN $LLAMA_BIN/llama-bench -m "$GGUF" -t $t -p 256 -n 128 -r 2 -o json 2>/dev/null \
      | python3 -c "import json,sys; d=json.load(sys.stdin); v={x['n_prompt'] and 'prefill256' or 'decode': x['avg_ts'] for x in d}; print(json.dumps({'engine':'llama.cpp','threads':$t,'round':$r,**v}))" | tee -a "$here/runs.jsonl"
  done
done
python3 "$here/summary.py" "$here/runs.jsonl" "${here%/}"
