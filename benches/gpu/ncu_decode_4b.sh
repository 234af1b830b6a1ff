#!/usr/bin/env bash
# One device call: Nsight Compute's time of every kernel, cuBLAS's included (which CubeCL's own
# profile cannot see), through eager (uncaptured) steps of the offline workload's shapes:
# Qwen3-4B config, random bf16 weights, ROWS requests of PROMPT_TOKENS random tokens prefilled
# in one step (the step budget is set to hold them all, so every later step decodes all rows,
# at offline's contexts), then NEW_TOKENS - 1 decode steps. Few steps keep ncu's per-kernel
# cost (it serialises and times each launch) to a few thousand launches.
# benches/gpu/ncu_steps.py splits the launches into engine steps (each ends in the argmax) and
# summarises, per kernel, the last step with every row decoding, and the last prefill step.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz. Writes $OUT/ncu_steps.txt and
# $OUT/ncu.csv.xz. Env: ROWS (256), PROMPT_TOKENS (512), NEW_TOKENS (4).
set -u
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
ensure_cublas
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
CK=$(qwen3_4b_dir)
rows=${ROWS:-256}
printf '[plugins.qwen3-4b-instruct-2507]\ncuda_graphs = false\nmax_num_batched_tokens = %d\nkv_cache_gb = 40\n' $(( rows * ${PROMPT_TOKENS:-512} )) > /tmp/eager.toml
random_prompts $rows ${PROMPT_TOKENS:-512} > /tmp/p.jsonl
start=$SECONDS
XDG_CACHE_HOME=/tmp/xdg timeout ${NCU_TIMEOUT:-300} $NCU --csv --metrics gpu__time_duration.sum --clock-control none --cache-control none \
  --log-file /tmp/ncu.csv $PIO --config /tmp/eager.toml run $PD --model $CK --random-weights --prompts-file /tmp/p.jsonl \
  --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens ${NEW_TOKENS:-4} > /tmp/run.out 2> /tmp/run.err
echo "== ncu run: exit $? after $(( SECONDS - start )) s"; tail -3 /tmp/run.err; grep -v "^\"" /tmp/ncu.csv | tail -3
python3 benches/gpu/ncu_steps.py /tmp/ncu.csv $rows | tee $OUT/ncu_steps.txt
xz -T4 -c /tmp/ncu.csv > $OUT/ncu.csv.xz
