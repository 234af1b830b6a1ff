#!/usr/bin/env bash
# One device call for the serving load benchmark (issue 18): `inference-pio serve` and
# llama.cpp's `llama-server -np 64 -cb` (built from the pinned peer source in the background)
# on the same Qwen3-4B checkpoint (real config, random bf16 weights; GGUF BF16 for llama.cpp),
# driven by benches/serve_load.py with the same workloads:
#   c1      concurrency 1, 8 random 512-token prompts, 128 output tokens
#   c64     concurrency 64, 128 prompts
#   prefix  concurrency 64, 64 prompts sharing a 1,024-token prefix + 64 distinct tokens
#   rate8   Poisson 8 requests/s, 64 prompts (concurrency cap 64)
#   c16     concurrency 16, 64 prompts (only when named in RUNS)
# plus `inference-pio run`'s batch-1 decode of the same shape (the reference for c1's ITL).
# Ours runs while llama.cpp builds (at nice 19, so the servers' threads come first);
# llama-server runs after, alone.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz, .gpu/COMMIT, .gpu/peers/.
# Writes $OUT/{log.txt,load.jsonl,run_b1.json,device.txt,commit.txt,ours.log,llama.log}.
# Env: BUDGET (s, default 400), STAGES (default "prep ours llama"), RUNS (default
# "c1 c64 prefix rate8").
set -uo pipefail
BUDGET=${BUDGET:-400}
STAGES=${STAGES:-prep ours llama}
RUNS=${RUNS:-c1 c64 prefix rate8}
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET - SECONDS )); }
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
cat .gpu/COMMIT > $OUT/commit.txt 2>/dev/null || echo unknown > $OUT/commit.txt
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
CK=/tmp/q4b

if has prep; then
  bash .gpu/peers/build_llamacpp.sh /tmp/llama.cpp
  sleep 2
  # Later children inherit the build shell's niceness.
  for p in $(pgrep -f "llama.cpp' && cmake"); do renice -n 19 -p $p > /dev/null; done
  [ -f $CK/model.safetensors.index.json ] || [ -f $CK/model.safetensors ] || \
    python3 benches/gpu/make_random_checkpoint.py $P/primary/config.json $P/tests/fixtures/qwen3-tokenizer $CK 2>&1 | tail -1
  echo "checkpoint ready at $SECONDS s"
  # The GGUF is converted in the background while ours runs.
  ( while [ ! -d /tmp/llama.cpp/gguf-py ]; do sleep 2; done
    [ -f /tmp/q4b.gguf ] || PYTHONPATH=/tmp/llama.cpp/gguf-py nice -n 19 python3 /tmp/llama.cpp/convert_hf_to_gguf.py $CK \
      --outtype bf16 --outfile /tmp/q4b.gguf.part > /tmp/gguf.log 2>&1 && mv /tmp/q4b.gguf.part /tmp/q4b.gguf ) &
fi
printf '[plugins.%s]\nmax_num_batched_tokens = 8192\n' $ID > /tmp/serve.toml

wait_health() { # url seconds
  local i
  for i in $(seq 1 $(( $2 * 2 ))); do
    python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$1" 2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}
load() { # label port
  local label=$1 port=$2 r t
  for r in $RUNS; do
    t=$(( $(left) - 10 ))
    [ $t -lt 30 ] && { echo "no time for $label $r"; continue; }
    local common="--base-url http://127.0.0.1:$port --model q4b --label $label --out $OUT/load.jsonl --timeout $t"
    case $r in
      c1) timeout $t python3 benches/serve_load.py $common --workload random --num-prompts 8 --concurrency 1 --warmup 1 ;;
      c16) timeout $t python3 benches/serve_load.py $common --workload random --num-prompts 64 --concurrency 16 --seed 1 --warmup 16 ;;
      c64) timeout $t python3 benches/serve_load.py $common --workload random --num-prompts 128 --concurrency 64 --seed 2 --warmup 64 ;;
      rate8) timeout $t python3 benches/serve_load.py $common --workload random --num-prompts 64 --concurrency 64 --rate 8 --seed 3 ;;
      prefix) timeout $t python3 benches/serve_load.py $common --workload prefix --prefix-len 1024 --input-len 64 --num-prompts 64 --concurrency 64 --seed 4 ;;
    esac
  done
}
metrics() { # port
  python3 -c "import sys, urllib.request; print(urllib.request.urlopen('http://127.0.0.1:%s/metrics' % sys.argv[1], timeout=5).read().decode())" "$1" 2>/dev/null \
    | grep -E "^inference_pio:(num_|kv_|prefix|request_|generation_tokens|prompt_tokens)" | head -24
}

if has ours; then
  $PIO serve $PD --config /tmp/serve.toml --model $CK --served-model-name q4b --device cuda --dtype bf16 --port 8001 --max-queue 512 \
    > $OUT/ours.log 2>&1 &
  ours=$!
  if wait_health http://127.0.0.1:8001 120; then
    echo "ours serving at $SECONDS s"
    load ours 8001
    metrics 8001
  else
    echo "ours did not become healthy"; tail -5 $OUT/ours.log
  fi
  kill -TERM $ours; wait $ours; echo "ours exited $? at $SECONDS s"
  # `run`'s batch-1 decode of the same shape: c1's ITL reference.
  python3 -c "import random; r=random.Random(0); print(','.join(str(r.randrange(100,151000)) for _ in range(512)))" > /tmp/b1.txt
  [ $(left) -gt 150 ] && timeout 60 $PIO run $PD --config /tmp/serve.toml --model $CK --device cuda --dtype bf16 --greedy --ignore-eos --json \
    --prompt-ids "$(cat /tmp/b1.txt)" --max-new-tokens 128 --repeat 2 > $OUT/run_b1.json 2> /tmp/run_b1.err
  echo "run b1: exit $? at $SECONDS s"; tail -1 /tmp/run_b1.err
fi

if has llama; then
  while { [ ! -f /tmp/llama.cpp.done ] || [ ! -f /tmp/q4b.gguf ]; } && [ $(left) -gt 45 ]; do sleep 3; done
  echo "llama.cpp build status $(cat /tmp/llama.cpp.done 2>/dev/null || echo running), gguf $(ls /tmp/q4b.gguf 2>/dev/null || echo missing) at $SECONDS s"
  if [ "$(cat /tmp/llama.cpp.done 2>/dev/null)" = 0 ] && [ -f /tmp/q4b.gguf ]; then
    /tmp/llama.cpp/build/bin/llama-server -m /tmp/q4b.gguf -ngl 99 -fa on -np 64 -cb -c $(( 64 * 1280 )) -b 2048 -ub 512 \
      --port 8002 --alias q4b > $OUT/llama.log 2>&1 &
    llama=$!
    if wait_health http://127.0.0.1:8002 60; then
      echo "llama-server serving at $SECONDS s"
      load llama-server 8002
    else
      echo "llama-server did not become healthy"; tail -5 $OUT/llama.log
    fi
    kill -TERM $llama; wait $llama
  else
    tail -3 /tmp/llama.cpp.build.log /tmp/gguf.log
  fi
fi
echo "done at $SECONDS s"
