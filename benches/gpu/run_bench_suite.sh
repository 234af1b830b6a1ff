#!/usr/bin/env bash
# `inference-pio bench --suite all` on the GPU (issue 23): Qwen3-4B-Instruct-2507 and
# Qwen3-Coder-30B-A3B (their real configs, random bf16 weights drawn on the device), each
# report with its HTML page, plus the peers where a suite has a counterpart, on the same
# machine: llama.cpp (`llama-bench` for the speed suite's prompt lengths and generation
# lengths, `llama-batched-bench` for the throughput suite's batch sizes) on the saved Qwen3-4B
# checkpoint converted to GGUF BF16, and transformers (eager, bf16) at batch 1.
# The llama.cpp build (background, cores 6 and up) and the saved checkpoint (drawn on the GPU
# before the suites) are made by the `prepare` stage and kept in /tmp, so a later call on the
# same held machine can run `peers`.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so,libqwen3_coder_30b.so}.xz,
# .gpu/COMMIT, .gpu/peers/.
# Writes $OUT/{log.txt,device.txt,peers.json} and $OUT/bench-{4b,30b}/report.{json,html}.
# Env: BUDGET (s, default 570), STAGES (default "prepare 4b 30b peers"), ARGS_4B / ARGS_30B
# (extra `bench` arguments, default none / "--quick"), BENCH_CONFIG (a config file for both),
# SUITE (default all).
set -uo pipefail
BUDGET=${BUDGET:-570}
STAGES=${STAGES:-prepare 4b 30b peers}
source benches/gpu/lib.sh
for f in inference-pio libqwen3_4b_instruct_2507.so libqwen3_coder_30b.so; do [ -f .gpu/$f.xz ] && unpack_gpu_binaries $f; done
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET - SECONDS )); }
P=plugins/qwen3-4b-instruct-2507
SAVED=/tmp/q4b
B=/tmp/llama.cpp/build/bin
export INFERENCE_PIO_COMMIT=$(cat .gpu/COMMIT 2>/dev/null || echo unknown)

# The checkpoint is drawn on the GPU and saved before the suites start (drawn on the CPU beside
# the llama.cpp build it was not done 7 minutes later, on the 2026-12-06 H100); the build goes
# on in the background on cores 6 and up while the suites run on 0-5.
if has prepare; then
  prepare_peers $P/primary/config.json $P/tests/fixtures/qwen3-tokenizer $SAVED
  while [ ! -f /tmp/ckpt.done ] && [ ! -f $SAVED/model.safetensors.index.json ] && [ ! -f $SAVED/model.safetensors ] && [ $(left) -gt 120 ]; do sleep 2; done
  echo "checkpoint: status $(cat /tmp/ckpt.done 2>/dev/null || echo unfinished) at $SECONDS s"
fi

# suite NAME DIR ARGS...: `bench --suite all` on DIR (random weights) into $OUT/bench-NAME.
suite() {
  local name=$1 dir=$2; shift 2
  local t=$(( $(left) - 20 )); [ $t -lt 60 ] && { echo "no time for bench $name"; return; }
  local start=$SECONDS
  mkdir -p $OUT/bench-$name
  INFERENCE_PIO_LOG=1 timeout $t taskset -c 0-5 $PIO bench $PD ${BENCH_CONFIG:+--config $BENCH_CONFIG} --model $dir --random-weights --device cuda --dtype bf16 --suite ${SUITE:-all} --out $OUT/bench-$name "$@" \
    > /tmp/bench_$name.out 2> /tmp/bench_$name.err
  echo "bench $name: exit $? after $(( SECONDS - start )) s"
  grep -a -v "^\s*$" /tmp/bench_$name.err > $OUT/bench-$name/stderr.txt
  grep -a "bench step\|KV cache\|panicked\|rror" $OUT/bench-$name/stderr.txt | tail -12
  tail -5 /tmp/bench_$name.out
}
has 4b && suite 4b "$(qwen3_4b_dir)" ${ARGS_4B:-}
has 30b && suite 30b "$(qwen3_coder_30b_dir)" ${ARGS_30B:---quick} --memory-model /tmp/m4b

if has peers; then
  while [ ! -f /tmp/llama.cpp.done ] && [ $(left) -gt 200 ]; do sleep 5; done
  while [ ! -f /tmp/ckpt.done ] && [ ! -f $SAVED/model.safetensors.index.json ] && [ ! -f $SAVED/model.safetensors ] && [ $(left) -gt 200 ]; do sleep 5; done
  if [ "$(cat /tmp/llama.cpp.done 2>/dev/null)" = 0 ]; then
    [ -f /tmp/q4b.gguf ] || PYTHONPATH=/tmp/llama.cpp/gguf-py timeout $(( $(left) - 60 )) python3 /tmp/llama.cpp/convert_hf_to_gguf.py $SAVED --outtype bf16 --outfile /tmp/q4b.gguf 2>&1 | tail -1
    # The speed suite's counterparts: prompt processing at its prompt lengths, generation at
    # its lengths (flash attention on, as our engine always is), medians of 3.
    [ -f /tmp/q4b.gguf ] && timeout $(( $(left) - 60 )) $B/llama-bench -m /tmp/q4b.gguf -ngl 99 -fa 1 -p 20,50,100,512,2048 -n 128,512 -r 3 > /tmp/llama_bench_suite.txt 2>&1
    grep '^|' /tmp/llama_bench_suite.txt
    # The throughput suite's batch sizes: 1, 8, 32 and 64 sequences of 128 + 128 tokens.
    [ -f /tmp/q4b.gguf ] && [ $(left) -gt 60 ] && timeout $(( $(left) - 40 )) $B/llama-batched-bench -m /tmp/q4b.gguf -ngl 99 -fa on -c 20000 \
      -npp 128 -ntg 128 -npl 1,8,32,64 > /tmp/llama_batched_suite.txt 2>&1
    grep '^|' /tmp/llama_batched_suite.txt
  else
    echo "llama.cpp build not done (status $(cat /tmp/llama.cpp.done 2>/dev/null || echo running)) at $SECONDS s"
  fi
  # transformers, batch 1, at the speed suite's 512-token prompt and 128 new tokens.
  t=$(( $(left) - 15 ))
  [ $t -gt 60 ] && [ -f $SAVED/config.json ] && timeout $t python3 benches/peers/transformers_qwen3.py --model $SAVED --prompt-tokens 512 --new-tokens 128 --out /tmp/peer_transformers_4b.json 2>&1 | tail -2
fi

python3 - <<'PY'
import glob, json, os
o = os.environ["OUT"]
out = {"commit": os.environ.get("INFERENCE_PIO_COMMIT"), "device": open(o + "/device.txt").read().strip()}
for f in ("/tmp/llama_bench_suite.txt", "/tmp/llama_batched_suite.txt"):
    if os.path.exists(f):
        out["llama_cpp_" + os.path.basename(f)[6:-4]] = [l for l in open(f).read().splitlines() if l.startswith("|")]
if os.path.exists("/tmp/peer_transformers_4b.json"):
    out["transformers_4b"] = json.load(open("/tmp/peer_transformers_4b.json"))
json.dump(out, open(o + "/peers.json", "w"), indent=1)
PY
echo "done at $SECONDS s"
