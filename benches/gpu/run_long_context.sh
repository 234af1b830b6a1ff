#!/usr/bin/env bash
# One device call: decode steps past the first rotary tables on CUDA (the tables start at
# 1,024 positions and double; recordings are dropped when they grow).
# 1. A tiny Qwen3 (.gpu/long-fixture: qwen3-tiny-a, its config allowing 4,096 positions),
#    a 1,000-token prompt and 1,100 greedy tokens (positions to 2,099: two growths), f32:
#    CUDA with recorded steps, CUDA with every step from the host (`cuda_graphs = false`,
#    no tables) and the CPU run made beside the fixture (cpu.json): the token ids must agree.
# 2. Qwen3-4B's real config, random bf16 weights: a 2,000-token prompt and 256 new tokens,
#    batch 1 (pio-bench): speed and peak GPU memory past the growths.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so}.xz, .gpu/long-fixture.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio pio-bench libqwen3_4b_instruct_2507.so
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
L=.gpu/long-fixture
cp plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer/tokenizer.json $L/
printf '[plugins.qwen3-4b-instruct-2507]\ncuda_graphs = false\n' > /tmp/nographs.toml
: > /tmp/graphs.toml
for g in graphs nographs; do
  INFERENCE_PIO_LOG=1 timeout 150 $PIO --config /tmp/$g.toml run $PD --model $L --prompt-ids "$(cat $L/prompt_ids.txt)" --json --device cuda \
    --dtype f32 --greedy --ignore-eos --max-new-tokens 1100 > $OUT/long_$g.json 2> $OUT/long_$g.stderr.txt
  echo "$g: exit $?"; grep -c "recording the decode step" $OUT/long_$g.stderr.txt
done
python3 - $L/cpu.json $OUT/long_graphs.json $OUT/long_nographs.json <<'PY' 2>&1 | tee $OUT/long_check.txt
import json, sys
cpu, graphs, host = (json.load(open(p))["token_ids"] for p in sys.argv[1:4])
def agree(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print("tokens:", len(cpu), len(graphs), len(host))
print("CUDA recorded == CUDA from the host:", graphs == host, "(first difference at new token", agree(graphs, host), ")")
print("CUDA recorded vs CPU: first difference at new token", agree(graphs, cpu), "of", len(cpu))
PY
grep -h "recording the decode step" $OUT/long_graphs.stderr.txt | head -12
CK=$(qwen3_4b_dir)
timeout 240 .gpu/bin/pio-bench --host $PIO --model $CK --random-weights --prompt-tokens 2000 --new-tokens 256 --batch 1 --runs 2 \
  --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" --commit "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" \
  --out $OUT/pio_4b_long.json 2> $OUT/pio_4b_long_stderr.txt
echo "pio-bench 4B long: exit $?"
python3 -c "import json; d=json.load(open('$OUT/pio_4b_long.json')); print({k: d.get(k) for k in ['prompt_tokens','median_prefill_tokens_per_s','median_steady_decode_tokens_per_s','peak_gpu_mib']})" || tail -5 $OUT/pio_4b_long_stderr.txt
echo "script used $SECONDS s"
