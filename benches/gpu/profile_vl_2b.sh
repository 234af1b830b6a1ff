#!/usr/bin/env bash
# One device call: CubeCL's kernel profile (each launch timed, `[profiling.logger] level =
# "basic"`) of a one-image prompt on Qwen3-VL-2B's real config (random bf16 weights), eager
# (no CUDA graphs), one new token, run three times: the last run's vision tower and prefill,
# summarised per kernel by benches/gpu/profile_summary.py --all --last-run. cuBLAS products are not CubeCL launches and do not
# appear; the wall time of the request is printed beside the kernels' total.
# Carried: .gpu/{inference-pio,libqwen3_vl_2b.so}.xz. Writes $OUT/profile_SIDE.txt.
# Env: SIDES (default "1344").
set -u
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_vl_2b.so
ensure_cublas
CK=/tmp/vlp; qwen3_vl_2b_dir $CK
printf '[plugins.qwen3-vl-2b]\ncuda_graphs = false\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/eager.toml
for side in ${SIDES:-1344}; do
  python3 -c "
import numpy as np, sys
from PIL import Image
s = int(sys.argv[1]); y, x = np.mgrid[0:s, 0:s]
Image.fromarray(np.stack([x * 255 // s, y * 255 // s, (x + y) * 127 // s % 256], -1).astype(np.uint8)).save(f'/tmp/img{s}.png')" $side
  printf '[profiling.logger]\nlevel = "basic"\nfile = "/tmp/profile_%s.log"\n' $side > cubecl.toml
  start=$SECONDS
  XDG_CACHE_HOME=/tmp/xdg timeout 200 $PIO --config /tmp/eager.toml run $PD --model $CK --random-weights --image /tmp/img$side.png \
    --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 1 --json --repeat 3 > /tmp/run_$side.json 2> /tmp/run_$side.err
  echo "== $side: exit $? after $(( SECONDS - start )) s"; tail -2 /tmp/run_$side.err
  rm -f cubecl.toml
  python3 -c "import json; t=json.load(open('/tmp/run_$side.json'))['timings']; print('time to first token (warm, last run)', t['time_to_first_token_s'], 's')" | tee $OUT/profile_$side.txt
  python3 benches/gpu/profile_summary.py /tmp/profile_$side.log --all --last-run | head -32 | tee -a $OUT/profile_$side.txt
done
