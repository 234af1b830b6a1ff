#!/usr/bin/env bash
# One device call: CubeCL's kernel profile (each kernel timed, `[profiling.logger] level =
# "basic"`) of a few eager decode steps of Qwen3-4B shapes (random bf16 weights), summarised per
# kernel for the last step by benches/gpu/profile_summary.py. Carried: .gpu/inference-pio.xz,
# .gpu/libqwen3_4b_instruct_2507.so.xz. Writes $OUT/{profile_summary.txt,profile.log.xz,run_stderr.txt}.
# Env: PROMPT_TOKENS (default 8), NEW_TOKENS (default 6), ALL (1: summarise every launch after
# the weights instead of the last decode step, for a prefill: PROMPT_TOKENS=2048 NEW_TOKENS=1).
set -u
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
CK=/tmp/m4b; mkdir -p $CK; P=plugins/qwen3-4b-instruct-2507
cp $P/primary/config.json $CK/; cp -L $P/tests/fixtures/qwen3-tokenizer/tokenizer.json $P/tests/fixtures/qwen3-tokenizer/tokenizer_config.json $CK/
printf '[plugins.qwen3-4b-instruct-2507]\ncuda_graphs = false\n' > /tmp/eager.toml
printf '[profiling.logger]\nlevel = "basic"\nfile = "%s/profile.log"\n' "$OUT" > cubecl.toml
XDG_CACHE_HOME=/tmp/xdg timeout 150 $PIO --config /tmp/eager.toml run $PD --model $CK --random-weights --prompt-ids $(seq -s, 1000 $(( 999 + ${PROMPT_TOKENS:-8} ))) --device cuda --dtype bf16 --greedy --max-new-tokens ${NEW_TOKENS:-6} > $OUT/run.txt 2> $OUT/run_stderr.txt; echo "run exit $?"
rm -f cubecl.toml
python3 benches/gpu/profile_summary.py $OUT/profile.log $([ "${ALL:-0}" = 1 ] && echo --all) | tee $OUT/profile_summary.txt
xz -9 $OUT/profile.log
