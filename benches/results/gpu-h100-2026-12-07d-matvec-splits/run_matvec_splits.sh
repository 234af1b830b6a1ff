#!/usr/bin/env bash
# One device call for the matrix-vector kernel's split channels (issue 20, `matvec::splits_for`):
# kernel_check's matvec group with the split products (the default) and with none
# (INFERENCE_PIO_MATVEC_SPLITS=1); the tiny Qwen3 fixtures on CUDA (f32, bf16); then Qwen3-4B's
# real config with random bf16 weights, batch-1 and batch-2 decode, split and unsplit
# alternating over ROUNDS rounds (pio-bench, 128-token prompt, 256 new tokens).
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,kernel_check,qwen3-tokenizer.json}.xz,
# .gpu/COMMIT; the tree holds plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-{b,c}.
set -uo pipefail
source benches/gpu/lib.sh
T=plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer
mkdir -p $T && [ -f .gpu/qwen3-tokenizer.json.xz ] && xz -dc .gpu/qwen3-tokenizer.json.xz > $T/tokenizer.json
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so kernel_check
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
for s in default 1; do
  ( [ $s = 1 ] && export INFERENCE_PIO_MATVEC_SPLITS=1
    timeout 150 .gpu/bin/kernel_check matvec 2>&1 | grep -v "^\[" > $OUT/kernel_check_matvec_splits_$s.txt; echo "kernel_check ($s) exit $?" )
done
grep -E "FAIL|passed|failed" $OUT/kernel_check_matvec_splits_default.txt
paste -d'|' <(grep -o "^[^:]*: rel L2 [^|]*| kernel *[0-9.]* µs *[0-9]* GB/s" $OUT/kernel_check_matvec_splits_default.txt) \
  <(grep -o "kernel *[0-9.]* µs *[0-9]* GB/s" $OUT/kernel_check_matvec_splits_1.txt) | tee $OUT/matvec_ab.txt
echo "kernels done at $SECONDS s"
F=plugins/qwen3-4b-instruct-2507/tests/fixtures
for m in qwen3-tiny-b qwen3-tiny-c; do gpu_parity $F $m f32 bf16 2>&1 | tail -4; done
echo "parity done at $SECONDS s"
CK=$(qwen3_4b_dir)
: > /tmp/empty.toml
for r in $(seq ${ROUNDS:-3}); do
  for s in default 1; do
    for b in 1 2; do
      ( [ $s = 1 ] && export INFERENCE_PIO_MATVEC_SPLITS=1
        timeout 120 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $CK --random-weights --prompt-tokens 128 --new-tokens 256 \
          --batch $b --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
          --commit "$(cat .gpu/COMMIT)" --out $OUT/pio_splits_${s}_b${b}_r$r.json 2> /tmp/pio.err || tail -3 /tmp/pio.err )
      python3 -c "import json; d=json.load(open('$OUT/pio_splits_${s}_b${b}_r$r.json')); print('round $r splits $s batch $b: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1
    done
  done
done
echo "all done at $SECONDS s"
