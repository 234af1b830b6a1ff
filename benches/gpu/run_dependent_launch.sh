#!/usr/bin/env bash
# One device call for programmatic dependent launch (issue 20; kernels/cubecl-cuda-stream/
# src/dependent_launch.rs): every CubeCL kernel waits for the grid before it as its first
# statement and is launched as a dependent, so its launch overlaps the previous kernel's tail.
# 1. kernel_check's groups of the decode step, dependent launches and the matrix-vector
#    kernel's L2 prefetch switched on: every kernel's result; matvec and launch (a
#    recorded chain's cost per kernel) also without the prefetch (INFERENCE_PIO_MATVEC_PREFETCH=0),
#    launch also with plain launches (INFERENCE_PIO_PDL=0).
# 2. The tiny Qwen3 fixtures on CUDA (f32, bf16) against transformers' references.
# 3. Qwen3-4B's real config, random bf16 weights: batch-1 and batch-8 decode (pio-bench, 128-token
#    prompt, 256 new), alternating over ROUNDS rounds: all three off, then the keys and values
#    written in the rotation's kernel (INFERENCE_PIO_KV_IN_ROTATION=1), with dependent launches
#    too, and with the prefetch too.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,kernel_check,qwen3-tokenizer.json}.xz,
# .gpu/COMMIT (optional: .gpu/libqwen3_vl_2b.so.xz, then run_vl_dependent.sh runs after); the tree
# holds plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-{b,c}.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so kernel_check
ensure_cublas
# All three are off unless switched on; the checks below run with them on (a variant sets its own).
export INFERENCE_PIO_PDL=1 INFERENCE_PIO_MATVEC_PREFETCH=1 INFERENCE_PIO_KV_IN_ROTATION=1
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
# Order: what matters most first (a short device lease may end the call early).
F=plugins/qwen3-4b-instruct-2507/tests/fixtures
for m in qwen3-tiny-b qwen3-tiny-c; do gpu_parity $F $m f32 2>&1 | tail -4; done
echo "parity done at $SECONDS s"
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
# Variants: INFERENCE_PIO_KV_IN_ROTATION:INFERENCE_PIO_PDL:INFERENCE_PIO_MATVEC_PREFETCH.
variants="0:0:0 1:0:0 1:1:0 1:1:1"
decode_round() { local r=$1

  for variant in $variants; do
    IFS=: read k p f <<< "$variant"
    for b in 1 8; do
      INFERENCE_PIO_KV_IN_ROTATION=$k INFERENCE_PIO_PDL=$p INFERENCE_PIO_MATVEC_PREFETCH=$f timeout 150 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
          --batch $b --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
          --commit "$(cat .gpu/COMMIT)" --out $OUT/pio_kv${k}_pdl${p}_pf${f}_b${b}_r$r.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
      python3 -c "import json; d=json.load(open('$OUT/pio_kv${k}_pdl${p}_pf${f}_b${b}_r$r.json')); print('round $r kv-in-rotation $k dependent $p prefetch $f batch $b: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1
    done
  done
}
decode_round 1
echo "4B round 1 done at $SECONDS s"
# With the VL plugin carried: run_vl_dependent.sh's Qwen3-VL checks and 2B decode (its 4B runs
# skipped: done here).
[ -f .gpu/libqwen3_vl_2b.so.xz ] && NO_4B=1 ROUNDS=${ROUNDS:-2} bash benches/gpu/run_vl_dependent.sh
( export INFERENCE_PIO_PDL=1 INFERENCE_PIO_MATVEC_PREFETCH=1 INFERENCE_PIO_KV_IN_ROTATION=1
timeout ${KERNEL_TIMEOUT:-120} .gpu/bin/kernel_check matvec kv-write elementwise launch 2>&1 | grep -v "^\[" > $OUT/kernel_check_pdl.txt; echo "kernel_check (dependent, prefetch) exit $?"
grep -cE " ok( |$)" $OUT/kernel_check_pdl.txt | sed 's/^/checks ok: /'
grep -E "FAIL|passed|failed|panicked|rror" $OUT/kernel_check_pdl.txt | head -20
INFERENCE_PIO_MATVEC_PREFETCH=0 timeout 90 .gpu/bin/kernel_check matvec launch 2>&1 | grep -v "^\[" > $OUT/kernel_check_noprefetch.txt
INFERENCE_PIO_PDL=0 INFERENCE_PIO_MATVEC_PREFETCH=0 timeout 60 .gpu/bin/kernel_check launch 2>&1 | grep -v "^\[" > $OUT/kernel_check_launch_plain.txt
echo "matvec, prefetch | none:"
paste -d'|' <(grep -o "^[^:]*: rel L2 [^|]*| kernel *[0-9.]* µs *[0-9]* GB/s" $OUT/kernel_check_pdl.txt) \
  <(grep -o "kernel *[0-9.]* µs *[0-9]* GB/s" $OUT/kernel_check_noprefetch.txt) | head -24
echo "launch chains: plain | dependent, no prefetch | dependent, prefetch:"
grep -h "chain" $OUT/kernel_check_launch_plain.txt $OUT/kernel_check_noprefetch.txt $OUT/kernel_check_pdl.txt
)
echo "kernels done at $SECONDS s"
for r in $(seq 2 ${ROUNDS:-2}); do decode_round $r; done
echo "all done at $SECONDS s"
