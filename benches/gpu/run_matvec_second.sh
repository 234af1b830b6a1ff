#!/usr/bin/env bash
# One device call: the matrix-vector kernel checked and timed (kernel_check), the sandbox
# diagnosis with the thread-name rule (diagnose_worker_cuda.py), the worker at security
# `high` and `maximum` on CUDA (tiny Qwen3-MoE, f32; tokens must equal the in-process run's),
# then Qwen3-Coder-30B-A3B end to end (tiny f32/bf16 parity, graphs, eager, transformers
# eager and static cache + compile). Carried:
# .gpu/{inference-pio,libqwen3_coder_30b.so,kernel_check}.xz. Results in $OUT/results.tar.xz.
set -uo pipefail
ROOT_OUT=$OUT
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_coder_30b.so kernel_check
mkdir -p $ROOT_OUT/kernels $ROOT_OUT/sandbox $ROOT_OUT/30b
export XDG_CACHE_HOME=/tmp/xdg
timeout 150 .gpu/bin/kernel_check 2>&1 | tee $ROOT_OUT/kernels/kernel_check.txt | grep -v "^\[" ; echo "kernel_check exit ${PIPESTATUS[0]} at $SECONDS s"
timeout 120 python3 benches/gpu/diagnose_worker_cuda.py $ROOT_OUT/sandbox/diagnose.json > $ROOT_OUT/sandbox/diagnose.txt 2>&1; grep -E "^ ?[0-9]+ " $ROOT_OUT/sandbox/diagnose.txt | cut -c1-160
Q=plugins/qwen3-coder-30b/tests/fixtures
IDS=$(python3 -c "import json; print(','.join(map(str, json.load(open('$Q/qwen3moe-tiny-a.reference.json'))['prompts'][-1]['ids'])))")
# A copy without symlinks: the fixture's tokenizer links into another plugin's folder, which
# the worker's allowlist (the model directory) rightly refuses.
rm -rf /tmp/tiny && cp -rL $Q/qwen3moe-tiny-a /tmp/tiny
timeout 90 $PIO run $PD --model /tmp/tiny --prompt-ids "$IDS" --json --device cuda --dtype f32 --greedy --max-new-tokens 16 > $ROOT_OUT/sandbox/low_run.json 2> $ROOT_OUT/sandbox/low_stderr.txt
echo "in-process run exit $?"
SHA=$(sha256sum .gpu/bin/libqwen3_coder_30b.so | cut -d' ' -f1)
for level in high maximum; do
  printf '[plugins.qwen3-coder-30b]\nsecurity = "%s"\nallow_degraded = true\ntimeout_s = 120\n' $level > /tmp/$level.toml
  [ $level = maximum ] && printf 'sha256 = "%s"\n' $SHA >> /tmp/$level.toml
  timeout 60 $PIO --config /tmp/$level.toml $PD plugins info qwen3-coder-30b > $ROOT_OUT/sandbox/${level}_info.txt 2>&1
  timeout 90 $PIO --config /tmp/$level.toml run $PD --model /tmp/tiny --prompt-ids "$IDS" --json --device cuda --dtype f32 --greedy --max-new-tokens 16 > $ROOT_OUT/sandbox/${level}_run.json 2> $ROOT_OUT/sandbox/${level}_stderr.txt
  echo "$level run exit $?"; grep -v "^warning" $ROOT_OUT/sandbox/${level}_stderr.txt | tail -3 | cut -c1-400
  python3 - "$ROOT_OUT/sandbox/${level}_run.json" $ROOT_OUT/sandbox/low_run.json $level <<'PY' 2>&1 | tee -a $ROOT_OUT/sandbox/worker_cuda.txt
import json,sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    print(sys.argv[3], "(worker) on", a["model"]["device"], "tokens equal in-process:", a["token_ids"] == b["token_ids"])
except Exception as e: print(sys.argv[3], "no result:", e)
PY
done
OUT=$ROOT_OUT/30b WARM=0 BUDGET=$(( 560 - SECONDS )) NEW_TOKENS=48 TINY_DTYPES="f32 bf16" TINY_MODELS="qwen3moe-tiny-a qwen3moe-tiny-b" PEERS="eager static" bash benches/gpu/run_decode_graphs.sh 30b 2>&1 | tee $ROOT_OUT/30b/log.txt | grep -v '^  \|^ "' | tail -30
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT kernels sandbox 30b && rm -rf $ROOT_OUT/kernels $ROOT_OUT/sandbox $ROOT_OUT/30b
echo "used $SECONDS s"
