#!/usr/bin/env bash
# One device call of correctness checks on the GPU (not speed):
# 1. the tiny MoE fixtures (Qwen3-MoE and GLM-4.x MoE) through the CLI on CUDA, f32 and bf16,
#    against the committed transformers references (logits at every position, greedy tokens);
# 2. the same plugin at security level `high` (sandboxed worker process) on CUDA: `plugins info`
#    and one run, whose tokens must equal the in-process run's.
# Expects .gpu/inference-pio.xz, .gpu/libqwen3_coder_30b.so.xz, .gpu/libglm_4_7.so.xz (carried).
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_coder_30b.so libglm_4_7.so
export XDG_CACHE_HOME=/tmp/xdg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
Q=plugins/qwen3-coder-30b/tests/fixtures
G=plugins/glm-4-7/tests/fixtures
for m in qwen3moe-tiny-a qwen3moe-tiny-b; do gpu_parity $Q $m f32 bf16; done
for m in glm4moe-tiny-a glm4moe-tiny-b; do gpu_parity $G $m f32 bf16; done
echo "check phase used $SECONDS s"
# Security level high on the GPU.
cat > /tmp/high.toml <<'EOF'
[plugins.qwen3-coder-30b]
security = "high"
allow_degraded = true
timeout_s = 120
EOF
IDS=$(python3 -c "import json; print(','.join(map(str, json.load(open('$Q/qwen3moe-tiny-a.reference.json'))['prompts'][-1]['ids'])))")
timeout 60 $PIO --config /tmp/high.toml $PD plugins info qwen3-coder-30b 2>&1 | tee $OUT/high_info.txt
timeout 90 $PIO --config /tmp/high.toml run $PD --model $Q/qwen3moe-tiny-a --prompt-ids "$IDS" --json --device cuda --dtype f32 --greedy --max-new-tokens 16 > $OUT/high_run.json 2> $OUT/high_stderr.txt
echo "high run exit $?"; tail -5 $OUT/high_stderr.txt
python3 - "$OUT/high_run.json" /tmp/run.qwen3moe-tiny-a.f32.json.2 <<'PY' 2>&1 | tee -a $OUT/parity.txt
import json,sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print("high (worker) tokens equal in-process:", a["token_ids"] == b["token_ids"], "device:", a["model"]["device"])
PY
echo "script used $SECONDS s"
