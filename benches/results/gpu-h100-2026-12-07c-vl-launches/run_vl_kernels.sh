#!/usr/bin/env bash
# One device call after the vision tower's kernels (issue 19: `norm::layer_norm`,
# `rotary::rotary_f32`): kernel_check's vision group, then benches/gpu/run_vl_2b.sh (the tiny
# fixtures' greedy tokens on CUDA, the 2B config's time to first token beside transformers
# eager), then the same 2B runs with the plugin built before the change (A/B on one card).
# Carried: .gpu/{inference-pio,libqwen3_vl_2b.so,kernel_check}.xz, .gpu/COMMIT; the tree must
# hold plugins/qwen3-vl-2b/tests (its tiny fixtures, checked on CUDA by run_vl_2b.sh). With
# BEFORE=1 (a second call on the warm machine, .gpu/before/libqwen3_vl_2b.so.xz carried: the
# plugin before the change; both plugins with kernel_check do not fit one call's 64 MiB) only
# the A/B runs, on the checkpoint and images the first call left in /tmp. Writes
# $OUT/kernel_check_vision.txt and run_vl_2b.sh's files, or $OUT/before.json.
set -uo pipefail
source benches/gpu/lib.sh
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg
if [ -z "${BEFORE:-}" ]; then
  unpack_gpu_binaries kernel_check
  timeout 150 .gpu/bin/kernel_check vision 2>&1 | grep -v "^\[" | tee $OUT/kernel_check_vision.txt
  echo "kernel_check exit ${PIPESTATUS[0]} at $SECONDS s"
  # PROFILE=1: also CubeCL's per-launch profile of a 448x448 image prompt (launch counts).
  if [ -n "${PROFILE:-}" ]; then
    SIDES=448 timeout 150 bash benches/gpu/profile_vl_2b.sh > /dev/null 2>&1
    echo "profile done at $SECONDS s"; head -14 $OUT/profile_448.txt
  fi
  BUDGET=$(( ${BUDGET:-570} - SECONDS )) exec bash benches/gpu/run_vl_2b.sh
fi
unpack_gpu_binaries inference-pio libqwen3_vl_2b.so
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
# Each plugin beside its own copy of the host, so that each host finds only its plugin.
mkdir -p .gpu/before && xz -dc .gpu/before/libqwen3_vl_2b.so.xz > .gpu/before/libqwen3_vl_2b.so
cp .gpu/bin/inference-pio .gpu/before/
# A fresh machine (the first call's /tmp gone): the config with random weights, new images.
RW=""
if [ ! -f /tmp/vl2b/model.safetensors ] && ! ls /tmp/vl2b/*.safetensors > /dev/null 2>&1; then
  qwen3_vl_2b_dir /tmp/vl2b; RW=--random-weights
  python3 -c "
import numpy as np
from PIL import Image
rng = np.random.RandomState(0)
for s in (448, 1344):
    y, x = np.mgrid[0:s, 0:s]
    img = np.stack([x * 255 // s, y * 255 // s, ((x + y) * 127 // s) % 256], -1) + rng.randint(0, 16, (s, s, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f'/tmp/img{s}.png')"
  echo "fresh machine: random weights"
fi
for round in 1 2; do
  for which in before bin; do
    for side in 448 1344; do
      timeout 50 .gpu/$which/inference-pio run --plugin-dir .gpu/$which --config /tmp/vl.toml --model /tmp/vl2b $RW --image /tmp/img$side.png \
        --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 32 --json --repeat 3 \
        > /tmp/$which$side.$round.json 2> /tmp/$which$side.err || tail -2 /tmp/$which$side.err
    done
  done
done
python3 - <<'PY' | tee $OUT/before.json
import json
out = {}
for which in ("before", "bin"):
    for side in (448, 1344):
        for rnd in (1, 2):
            try:
                d = json.load(open(f"/tmp/{which}{side}.{rnd}.json"))
                out[f"{which} {side} round {rnd}"] = {"runs_ttft_s": [r["time_to_first_token_s"] for r in d["runs"]], "first8": d["token_ids"][:8]}
            except Exception as e:
                out[f"{which} {side} round {rnd}"] = {"error": str(e)}
print(json.dumps(out, indent=1))
PY
echo "all done at $SECONDS s"
