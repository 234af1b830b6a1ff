#!/usr/bin/env bash
# One device call: CubeCL's kernel profile (each launch timed, `[profiling.logger] level =
# "basic"`) of eager (uncaptured) decode steps of Qwen3-4B shapes (random bf16 weights) at
# several batch sizes through the serving core (`run --prompts-file`: distinct random prompts,
# submitted together), each summarised per kernel for its last decode step by
# benches/gpu/profile_summary.py. Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz.
# Writes $OUT/profile_ROWS.txt. Env: ROWS (default "1 32 256"), PROMPT_TOKENS (default 256),
# NEW_TOKENS (default 5), ALL (1: summarise every launch after the weights instead: a prefill
# step, e.g. ROWS=16 PROMPT_TOKENS=512 NEW_TOKENS=1 for one 8,192-token step of 16 chunks).
set -u
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
ensure_cublas
CK=$(qwen3_4b_dir)
printf '[plugins.qwen3-4b-instruct-2507]\ncuda_graphs = false\nmax_num_batched_tokens = 8192\n' > /tmp/eager.toml
for rows in ${ROWS:-1 32 256}; do
  random_prompts $rows ${PROMPT_TOKENS:-256} > /tmp/p$rows.jsonl
  printf '[profiling.logger]\nlevel = "basic"\nfile = "/tmp/profile_%s.log"\n' $rows > cubecl.toml
  start=$SECONDS
  XDG_CACHE_HOME=/tmp/xdg timeout 200 $PIO --config /tmp/eager.toml run $PD --model $CK --random-weights --prompts-file /tmp/p$rows.jsonl \
    --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens ${NEW_TOKENS:-5} > /tmp/run_$rows.json 2> /tmp/run_$rows.err
  echo "== rows $rows: exit $? after $(( SECONDS - start )) s"; tail -2 /tmp/run_$rows.err
  rm -f cubecl.toml
  python3 benches/gpu/profile_summary.py /tmp/profile_$rows.log $([ "${ALL:-0}" = 1 ] && echo --all) | head -28 | tee $OUT/profile_$rows.txt
done
