#!/usr/bin/env bash
# Qwen3-Coder-30B-A3B beside its peers (issue 23's bench with llama.cpp and transformers, issue
# 20's "the 30B may use 12 of its 48 layers for llama.cpp, both engines on the same file"): the
# real config cut to LAYERS decoder layers (default 12), random bf16 weights saved once as a
# checkpoint (make_random_checkpoint.py, Qwen's per-expert layout) and converted to GGUF BF16 by
# llama.cpp's own converter; then, on that one file pair, `inference-pio bench --suite
# speed,throughput`, llama.cpp's `llama-bench` (the speed suite's prompt and generation lengths)
# and `llama-batched-bench` (the throughput suite's batch sizes), and transformers eager at batch 1.
# A full 48-layer checkpoint is 61 GB and its GGUF as much again: both do not fit the GPU
# machine's 64 GiB disk.
#
# Stages (STAGES, default "prepare suite run"):
#   prepare  llama.cpp's build in the background on cores 4 and up (unless started: .gpu/peers/
#            carried); the checkpoint (/tmp/q30b, drawn on the GPU, before anything else uses
#            it), then its GGUF (/tmp/q30b.gguf) in the background on the build's cores (the
#            converter needs only the unpacked source); /tmp/q30b.done holds the exit status.
#   suite    `bench --suite all --quick` on the full 48-layer config with random weights drawn
#            on the device (ARGS_SUITE, default "--quick"), while the GGUF is written.
#   run      the three engines on the cut checkpoint (ours and transformers on cores 0-3), llama.cpp
#            once its build is done.
# Carried: .gpu/{inference-pio,libqwen3_coder_30b.so}.xz, .gpu/COMMIT, .gpu/peers/.
# Writes $OUT/bench-30b-peers/{report.json,report.html} (the cut checkpoint), $OUT/bench-30b/
# (the suite stage), $OUT/peers-30b.json, $OUT/log-30b-peers.txt, and a failed bench's log as
# $OUT/{bench-30b,bench-30b-peers}.err.
# Env: BUDGET (s, default 570), LAYERS, ARGS (extra `bench` arguments, default "--runs 1
# --duration 10").
set -uo pipefail
BUDGET=${BUDGET:-570}
STAGES=${STAGES:-prepare suite run}
LAYERS=${LAYERS:-12}
source benches/gpu/lib.sh
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET - SECONDS )); }
CK=/tmp/q30b
GGUF=/tmp/q30b.gguf
B=/tmp/llama.cpp/build/bin
FIX=plugins/qwen3-coder-30b/tests/fixtures
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log-30b-peers.txt) 2>&1
CORES=$(nproc)

BUILD_CPUS=4-$(( CORES - 1 ))
unpack_gpu_binaries inference-pio libqwen3_coder_30b.so
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
export INFERENCE_PIO_COMMIT=$(cat .gpu/COMMIT 2>/dev/null || echo unknown)

# run_bench NAME LABEL SECONDS ARGS...: `bench` on CUDA in bf16 into $OUT/NAME, its log lines
# kept in /tmp/NAME.err and the errors printed with the lines after them (an out-of-memory
# error's "Caused by" chain); on failure the log (less the per-step lines) goes to $OUT/NAME.err.
run_bench() {
  local name=$1 label=$2 t=$3 start=$SECONDS rc
  shift 3
  mkdir -p $OUT/$name
  INFERENCE_PIO_LOG=1 timeout $t taskset -c 0-3 $PIO bench $PD --device cuda --dtype bf16 --out $OUT/$name "$@" > /tmp/$name.out 2> /tmp/$name.err
  rc=$?
  echo "bench 30b ($label): exit $rc after $(( SECONDS - start )) s"
  grep -a "KV cache" /tmp/$name.err | tail -6
  grep -a -A4 "panicked\|rror" /tmp/$name.err | grep -av "bench step" | tail -16
  [ $rc = 0 ] || grep -av "bench step" /tmp/$name.err | tail -200 > $OUT/$name.err
  tail -3 /tmp/$name.out
}

if has prepare; then
  if [ ! -f /tmp/llama.cpp.started ] && [ -f .gpu/peers/build_llamacpp.sh ]; then
    taskset -c $BUILD_CPUS bash .gpu/peers/build_llamacpp.sh /tmp/llama.cpp
  fi
  df -h /tmp | tail -1
  if [ ! -f $CK/model.safetensors.index.json ]; then
    python3 benches/gpu/make_random_checkpoint.py plugins/qwen3-coder-30b/primary/config.json $FIX/qwen3-coder-tokenizer $CK \
      --layers $LAYERS > /tmp/q30b.log 2>&1 || { echo $? > /tmp/q30b.done; }
    echo "checkpoint ($LAYERS layers): $(tail -1 /tmp/q30b.log) at $SECONDS s"
  fi
  if [ ! -f /tmp/q30b.done ] && [ -f /tmp/llama.cpp/convert_hf_to_gguf.py ]; then
    ( PYTHONPATH=/tmp/llama.cpp/gguf-py taskset -c $BUILD_CPUS python3 /tmp/llama.cpp/convert_hf_to_gguf.py $CK \
        --outtype bf16 --outfile $GGUF >> /tmp/q30b.log 2>&1; echo $? > /tmp/q30b.done ) &
  fi
fi

if has suite; then
  t=$(( $(left) - 300 ))
  run_bench bench-30b "all suites, 48 layers" $t --model "$(qwen3_coder_30b_dir)" --random-weights --suite all ${ARGS_SUITE:---quick}
fi

if has run; then
  if [ -f $CK/model.safetensors.index.json ]; then
    t=$(( $(left) - 150 ))
    run_bench bench-30b-peers "$LAYERS layers" $t --model $CK --suite speed,throughput ${ARGS:---runs 1 --duration 10}
  fi
  t=$(( $(left) - 130 ))
  [ $t -gt 30 ] && [ -f $CK/model.safetensors.index.json ] && timeout $t taskset -c 0-3 python3 benches/peers/transformers_qwen3.py --model $CK \
    --prompt-tokens 512 --new-tokens 64 --out /tmp/peer_transformers_30b.json 2>&1 | tail -2
  while { [ ! -f /tmp/llama.cpp.done ] || [ ! -f /tmp/q30b.done ]; } && [ $(left) -gt 60 ]; do sleep 2; done
  echo "llama.cpp build: $(cat /tmp/llama.cpp.done 2>/dev/null || echo running), GGUF: $(cat /tmp/q30b.done 2>/dev/null || echo running) at $SECONDS s"
  if [ "$(cat /tmp/q30b.done 2>/dev/null)" = 0 ] && [ "$(cat /tmp/llama.cpp.done 2>/dev/null)" = 0 ]; then
    timeout $(( $(left) - 90 )) $B/llama-bench -m $GGUF -ngl 99 -fa 1 -p 20,50,100,512,2048 -n 128,512 -r ${LLAMA_REPS:-2} > /tmp/llama_bench_30b.txt 2>&1
    grep '^|' /tmp/llama_bench_30b.txt
    [ $(left) -gt 60 ] && timeout $(( $(left) - 45 )) $B/llama-batched-bench -m $GGUF -ngl 99 -fa on -c 20000 \
      -npp 128 -ntg 128 -npl 1,8,32,64 > /tmp/llama_batched_30b.txt 2>&1
    grep '^|' /tmp/llama_batched_30b.txt
  fi
  python3 - "$LAYERS" <<'PY'
import json, os, sys
o = os.environ["OUT"]
out = {"commit": os.environ.get("INFERENCE_PIO_COMMIT"), "device": open(o + "/device.txt").read().strip(),
       "layers": int(sys.argv[1]), "of_layers": 48}
for name, f in (("llama_cpp_bench", "/tmp/llama_bench_30b.txt"), ("llama_cpp_batched_bench", "/tmp/llama_batched_30b.txt")):
    if os.path.exists(f):
        out[name] = [l for l in open(f).read().splitlines() if l.startswith("|")]
if os.path.exists("/tmp/peer_transformers_30b.json"):
    out["transformers"] = json.load(open("/tmp/peer_transformers_30b.json"))
json.dump(out, open(o + "/peers-30b.json", "w"), indent=1)
PY
fi
echo "done at $SECONDS s"
