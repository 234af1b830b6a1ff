#!/usr/bin/env bash
# Chunks loaded together per lane in the int4/int8 matrix-vector kernel (issue 21; issue 20's
# kernels). SETTINGS (default "l1p8 l4p8"): each `lLpP` is INFERENCE_PIO_QUANT_LOADS=L (chunks
# of codes a lane loads together; l1 is the default) and INFERENCE_PIO_QUANT_PLANES=P. For each,
# kernel_check quant at 1 and 2 rows (BF16 and F32, every layout; KC=0 skips it), then Qwen3-4B
# (real config, random weights) batch-1 decode in int4 and int8 for each setting, alternating,
# for each of ROUNDS (default "1 2"; empty: no decode); BF16=1 adds bf16 weights to each round;
# GREEDY (below) compares greedy texts; no decode run starts after BUDGET seconds. Carried:
# .gpu/{inference-pio,pio-bench,kernel_check,libqwen3_4b_instruct_2507.so,
# qwen3-tokenizer.json}.xz and .gpu/COMMIT. (As it ran on 2026-12-07, with the fused
# quantization's settings since removed: benches/results/gpu-h100-2026-12-07n-quant-loads/.)
set -uo pipefail
source benches/gpu/lib.sh
device_setup inference-pio pio-bench kernel_check libqwen3_4b_instruct_2507.so
settings=${SETTINGS:-l1p8 l4p8}
# switches SETTING: the environment assignments of one setting.
switches() {
  [[ $1 =~ ^l([0-9]+)p([0-9]+)$ ]] || { echo "bad setting $1" >&2; return 1; }
  echo "INFERENCE_PIO_QUANT_LOADS=${BASH_REMATCH[1]} INFERENCE_PIO_QUANT_PLANES=${BASH_REMATCH[2]}"
}
for s in $settings; do
  [ "${KC:-1}" = 0 ] && break
  env KERNEL_CHECK_QUANT_ROWS=1,2 $(switches $s) timeout 150 .gpu/bin/kernel_check quant > $OUT/kernel_check_$s.txt 2>&1
  echo "kernel_check $s exit $? at $SECONDS s: ok $(grep -c ' ok ' $OUT/kernel_check_$s.txt), FAIL $(grep -c FAIL $OUT/kernel_check_$s.txt)"
  grep FAIL $OUT/kernel_check_$s.txt | head -3
done
CK=$(qwen3_4b_dir)
for mode in int8 int4; do
  printf '[plugins.qwen3-4b-instruct-2507]\nquantization = "%s"\n' $mode > /tmp/q_$mode.toml
done
printf '[plugins.qwen3-4b-instruct-2507]\n' > /tmp/q_bf16.toml
# GREEDY="SETTING..." (default: the first and last of SETTINGS): 48 greedy tokens of int4 and
# int8 weights through `run` for each, whose texts must be equal (the kernels give the same bits).
greedy_settings=${GREEDY-${settings%% *} ${settings##* }}
for mode in int4 int8; do
  for s in $greedy_settings; do
    env $(switches $s) timeout 90 $PIO run $PD --config /tmp/q_$mode.toml --model $CK --random-weights --device cuda --dtype bf16 \
      --prompt-ids 785,6722,315,9625,374 --greedy --max-new-tokens 48 > $OUT/greedy_${mode}_$s.txt 2> /tmp/run.err || tail -3 /tmp/run.err
    echo "greedy $mode $s: $(md5sum < $OUT/greedy_${mode}_$s.txt | cut -c1-12) ($(wc -c < $OUT/greedy_${mode}_$s.txt) bytes)" | tee -a $OUT/greedy.txt
  done
done
for r in ${ROUNDS-1 2}; do
  for mode in int4 int8 $([ "${BF16:-0}" = 1 ] && echo bf16); do
    for s in $([ $mode = bf16 ] && echo l1p8 || echo $settings); do
      [ $SECONDS -lt ${BUDGET:-100000} ] || { echo "budget: $mode $s round $r not run"; continue; }
      (export $(switches $s); bench_4b_decode 1 "$mode $s round $r" /tmp/q_$mode.toml)
      cp /tmp/pio.json $OUT/pio_${mode}_${s}_r$r.json 2>/dev/null
    done
  done
  echo "round $r done at $SECONDS s"
done
