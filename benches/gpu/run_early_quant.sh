#!/usr/bin/env bash
# Early weight loads in the quantized products (issue 20 / 21): kernel_check quant and matvec
# (every check), the tiny Qwen3 fixture's parity on CUDA, then Qwen3-4B (real config, random
# weights) batch-1 decode for bf16, int8, int4 and fp8 weights with the early loads on and off
# (INFERENCE_PIO_MATVEC_EARLY=0), alternating (ROUNDS, default "1"). Carried: .gpu/{inference-pio,pio-bench,
# kernel_check,libqwen3_4b_instruct_2507.so,qwen3-tokenizer.json}.xz and .gpu/COMMIT.
set -uo pipefail
source benches/gpu/lib.sh
device_setup inference-pio pio-bench kernel_check libqwen3_4b_instruct_2507.so
timeout 200 .gpu/bin/kernel_check quant matvec > $OUT/kernel_check.txt 2>&1; echo "kernel_check exit $? at $SECONDS s"
echo "checks ok: $(grep -c ' ok ' $OUT/kernel_check.txt), FAIL: $(grep -c FAIL $OUT/kernel_check.txt)"; grep FAIL $OUT/kernel_check.txt | head
gpu_parity plugins/qwen3-4b-instruct-2507/tests/fixtures qwen3-tiny-b f32 2>&1 | grep -E "worst|identical: False"
for mode in bf16 int8 int4 fp8; do
  if [ $mode = bf16 ]; then printf '[plugins.qwen3-4b-instruct-2507]\n'; else printf '[plugins.qwen3-4b-instruct-2507]\nquantization = "%s"\n' $mode; fi > /tmp/q_$mode.toml
done
for r in ${ROUNDS:-1}; do
  for mode in bf16 int8 int4 fp8; do
    for early in 1 0; do
      INFERENCE_PIO_MATVEC_EARLY=$early bench_4b_decode 1 "$mode early $early round $r" /tmp/q_$mode.toml
      cp /tmp/pio.json $OUT/pio_${mode}_early${early}_r$r.json 2>/dev/null
    done
  done
  echo "round $r done at $SECONDS s"
done
