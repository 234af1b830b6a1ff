#!/usr/bin/env bash
# One device call (issue 19's decode, issue 20's launches): Qwen3-VL with programmatic dependent
# launch (kernels/cubecl-cuda-stream/src/dependent_launch.rs).
# 1. The tiny Qwen3-VL fixtures' one-image prompt on CUDA, f32 and bf16, greedy against
#    transformers' tokens; run_vl_graphs.sh's server check (image A, B of the same grid, A, B:
#    a grid is recorded at its second image; each answer equals an unrecorded run).
# 2. Qwen3-VL-2B's real config, random bf16 weights: a 448x448 image prompt, 256 new tokens,
#    decode tok/s with dependent launches off and on, alternating over ROUNDS rounds; then
#    Qwen3-4B the same way (text, 128-token prompt) for the 4B path's fraction in this call.
# Carried: .gpu/{inference-pio,libqwen3_vl_2b.so,qwen3-tokenizer.json}.xz, .gpu/COMMIT
# (.gpu/bin/libqwen3_4b_instruct_2507.so and pio-bench from an earlier call on this machine,
# else .gpu/{...}.xz; NO_4B=1 skips them); the tree holds plugins/qwen3-vl-2b/tests.
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio libqwen3_vl_2b.so
for f in pio-bench libqwen3_4b_instruct_2507.so; do [ -f .gpu/$f.xz ] && unpack_gpu_binaries $f; done
ensure_cublas
# Dependent launches are on unless INFERENCE_PIO_PDL=0; the checks below run with them on (a variant sets its own).
export INFERENCE_PIO_PDL=1
export XDG_CACHE_HOME=/tmp/xdg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
for m in vl-tiny-a vl-tiny-b; do
  for dt in f32 bf16; do vl_tiny_one_image $m $dt | tee -a $OUT/tiny.txt; done
done
ONLY_CORRECTNESS=1 bash benches/gpu/run_vl_graphs.sh
echo "correctness done at $SECONDS s"
CK=/tmp/vl2b
qwen3_vl_2b_dir $CK
python3 - <<'PY'
import numpy as np
from PIL import Image
rng = np.random.RandomState(0)
side = 448
y, x = np.mgrid[0:side, 0:side]
img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side) % 256], -1) + rng.randint(0, 16, (side, side, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save("/tmp/img448.png")
PY
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
C4=$(qwen3_4b_dir)
: > /tmp/empty.toml
for r in $(seq ${ROUNDS:-2}); do
  for p in 0 1; do
    # 0: plain launches; 1: dependent launches.
    export INFERENCE_PIO_PDL=$p
    timeout 90 $PIO run $PD --config /tmp/vl.toml --model $CK --random-weights --image /tmp/img448.png --prompt "Describe this image." \
      --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 3 > /tmp/vl.$p.$r.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
    python3 - /tmp/vl.$p.$r.json "round $r dependent launch $p: 2B after a 448 image" <<'PY' | tee -a $OUT/decode.txt
import json, sys
try:
    d = json.load(open(sys.argv[1])); t = d["timings"]
    print(sys.argv[2], "decode", round(t["decode_tokens_per_s"], 1), "steady", round(t.get("steady_decode_tokens_per_s") or 0, 1), "tok/s; ttft",
          [round(r["time_to_first_token_s"] * 1e3, 1) for r in d.get("runs", [])], "ms; first8", d["token_ids"][:8])
except Exception as e:
    print(sys.argv[2], "error", e)
PY
    [ -x .gpu/bin/pio-bench ] && [ "${NO_4B:-0}" != 1 ] && INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin timeout 120 .gpu/bin/pio-bench --host $PIO --config /tmp/empty.toml --model $C4 --random-weights --prompt-tokens 128 --new-tokens 256 \
        --batch 1 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
        --commit "$(cat .gpu/COMMIT)" --out $OUT/pio4b_pdl${p}_r$r.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
    [ "${NO_4B:-0}" != 1 ] && python3 -c "import json; d=json.load(open('$OUT/pio4b_pdl${p}_r$r.json')); print('round $r dependent launch $p: 4B batch 1 steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" 2>&1 | tail -1 | tee -a $OUT/decode.txt
  done
done
echo "all done at $SECONDS s"
