#!/usr/bin/env bash
# One device call: Nsight Compute's time of every kernel, cuBLAS's included (which CubeCL's own
# profile cannot see), through eager (uncaptured) steps of the offline workload's shapes:
# Qwen3-4B's config (MODEL=qwen3-4b, the default) or Qwen3-Coder-30B-A3B's (MODEL=qwen3-coder-30b,
# its first LAYERS layers, default 12), random bf16 weights, ROWS requests of PROMPT_TOKENS random tokens prefilled
# in one step (the step budget is set to hold them all, so every later step decodes all rows,
# at offline's contexts), then NEW_TOKENS - 1 decode steps. Few steps keep ncu's per-kernel
# cost (it serialises and times each launch) to a few thousand launches.
# benches/gpu/ncu_steps.py splits the launches into engine steps (each ends in the argmax) and
# summarises, per kernel, the last step with every row decoding, and the last prefill step.
# Carried: .gpu/inference-pio.xz and the model's plugin (.gpu/libqwen3_4b_instruct_2507.so.xz or
# .gpu/libqwen3_coder_30b.so.xz). Writes $OUT/ncu_steps[_TAG].txt and $OUT/ncu[_TAG].csv.xz.
# Env: MODEL, LAYERS, ROWS (256), PROMPT_TOKENS (512), NEW_TOKENS (4), TAG (file name suffix),
# QUANT (the plugin's `quantization`: int8, int4, fp8; unset: the checkpoint's bf16).
set -u
source benches/gpu/lib.sh
case ${MODEL:-qwen3-4b} in
  qwen3-4b) lib=libqwen3_4b_instruct_2507.so section=qwen3-4b-instruct-2507 CK=$(qwen3_4b_dir) ;;
  qwen3-coder-30b)
    lib=libqwen3_coder_30b.so section=qwen3-coder-30b CK=$(qwen3_coder_30b_dir)
    python3 - "$CK/config.json" "${LAYERS:-12}" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_hidden_layers"] = int(sys.argv[2])
json.dump(c, open(sys.argv[1], "w"), indent=1)
PY
    ;;
  *) echo "MODEL must be qwen3-4b or qwen3-coder-30b"; exit 2 ;;
esac
unpack_gpu_binaries inference-pio $lib
ensure_cublas
tag=${TAG:+_$TAG}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
rows=${ROWS:-256}
printf '[plugins.%s]\ncuda_graphs = false\nmax_num_seqs = %d\nmax_num_batched_tokens = %d\nkv_cache_gb = 40\n' $section $rows $(( rows * ${PROMPT_TOKENS:-512} )) > /tmp/eager.toml
[ -n "${QUANT:-}" ] && printf 'quantization = "%s"\n' "$QUANT" >> /tmp/eager.toml
random_prompts $rows ${PROMPT_TOKENS:-512} > /tmp/p.jsonl
start=$SECONDS
XDG_CACHE_HOME=/tmp/xdg timeout ${NCU_TIMEOUT:-300} $NCU --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --clock-control none --cache-control none \
  --log-file /tmp/ncu$tag.csv $PIO --config /tmp/eager.toml run $PD --model $CK --random-weights --prompts-file /tmp/p.jsonl \
  --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens ${NEW_TOKENS:-4} > /tmp/run.out 2> /tmp/run.err
echo "== ncu run: exit $? after $(( SECONDS - start )) s"; tail -3 /tmp/run.err; grep -v "^\"" /tmp/ncu$tag.csv | tail -3
python3 benches/gpu/ncu_steps.py /tmp/ncu$tag.csv $rows | tee $OUT/ncu_steps$tag.txt
xz -T4 -c /tmp/ncu$tag.csv > $OUT/ncu$tag.csv.xz
