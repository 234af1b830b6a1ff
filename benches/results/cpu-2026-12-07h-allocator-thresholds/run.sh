#!/usr/bin/env bash
# Before / after the allocator thresholds (issue 26): the plugin files of two builds side by side
# (BEFORE, AFTER: directories holding libqwen3_coder_30b.so and libllama.so), three alternating
# rounds of four cases through `inference-pio run --json` on the CPU, peak RSS by /usr/bin/time.
# MOE: benches/cpu/make_qwen3moe_small_gguf.py --types Q4_0 (default /tmp/moe/qwen3moe-small-Q4_0.gguf);
# SMOL: the built-in model (`inference-pio models fetch`).
set -euo pipefail
BEFORE=${BEFORE:?} AFTER=${AFTER:?}
MOE=${MOE:-/tmp/moe/qwen3moe-small-Q4_0.gguf}
SMOL=${SMOL:-$(./target/debug/inference-pio models fetch | tail -1)}
OUT=${OUT:-runs.jsonl}
ids() { python3 -c "print(','.join(str((i * $2) % $3 + 11) for i in range($1)))"; }
P2048=$(ids 2048 7919 32000); P1500=$(ids 1500 7919 49000); P32=$(python3 -c 'print(",".join(str(i*7+11) for i in range(32)))')
: > "$OUT"
for r in 1 2 3; do
  for v in before after; do
    dir=$BEFORE; [ $v = after ] && dir=$AFTER
    for c in "moe2048|$MOE|$P2048|1" "smol1500|$SMOL|$P1500|64" "smol32|$SMOL|$P32|128" "moe32|$MOE|$P32|128"; do
      IFS='|' read -r name model ids new <<< "$c"
      /usr/bin/time -f "%M" -o /tmp/rss.txt ./target/debug/inference-pio run --plugin-dir "$dir" --model "$model" --prompt-ids "$ids" \
        --max-new-tokens "$new" --ignore-eos --greedy --device cpu --json 2>/dev/null > /tmp/out.json
      python3 -c "
import json; d=json.load(open('/tmp/out.json')); t=d['timings']; rss=int(open('/tmp/rss.txt').read().split()[-1])
print(json.dumps({'round': $r, 'variant': '$v', 'case': '$name', 'prefill_tok_s': round(t['prefill_tokens_per_s'],1), 'decode_tok_s': round(t['decode_tokens_per_s'],1), 'peak_rss_kb': rss, 'last_tokens': d['token_ids'][-3:]}))" | tee -a "$OUT"
    done
  done
done
