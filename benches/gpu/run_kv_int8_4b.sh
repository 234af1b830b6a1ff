#!/usr/bin/env bash
# The 8-bit KV caches (issue 21, `kv_cache_dtype = "int8"` / `"fp8"`), one device call: the
# attention kernels over coded pages and the write into them against their references
# (`kernel_check attention`), then Qwen3-4B (real config, random bf16 weights) with its KV
# cache in bf16 and in 8 bits (KVS) through pio-bench: the blocks the same memory holds (so the 8,192-token sequences
# that fit), the divergence of each 8-bit cache from bf16 on one teacher-forced prompt (`score
# --json`), then batch-1 decode after short and 8,192-token prompts and batch-32 decode.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,kernel_check}.xz,
# .gpu/COMMIT. Writes $OUT/{log.txt,device.txt,kernel_check.txt,results.json,runs.tgz,kv_int8.png}.
# Env: BUDGET (s, default 570), STAGES (default "kernels ours"), CASES (default "b1 b32 l8k"),
# KVS (the caches measured, default "bf16 int8"; "fp8" too), KC_GROUPS (kernel_check's groups,
# default "attention"; "kv-write" for the write alone).
set -uo pipefail
BUDGET=${BUDGET:-570}
STAGES=${STAGES:-kernels ours}
source benches/gpu/lib.sh
for f in inference-pio pio-bench libqwen3_4b_instruct_2507.so; do [ -f .gpu/$f.xz ] && unpack_gpu_binaries $f; done
export XDG_CACHE_HOME=/tmp/xdg
export INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET - SECONDS )); }
ID=qwen3-4b-instruct-2507

if has kernels && [ -f .gpu/kernel_check.xz ]; then
  unpack_gpu_binaries kernel_check
  timeout 200 .gpu/bin/kernel_check ${KC_GROUPS:-attention} > $OUT/kernel_check.txt 2>&1; echo "kernel_check exit $? at $SECONDS s"
  grep -E "FAIL|checks|failed to run|INT8|FP8|panicked" $OUT/kernel_check.txt | head -60
fi

CK=$(qwen3_4b_dir)
KVS=${KVS:-bf16 int8}
for kv in $KVS; do printf '[plugins.%s]\nkv_cache_dtype = "%s"\n' $ID $kv > /tmp/kv_$kv.toml; done
bench() { # kv case prompt_tokens new_tokens batch runs
  local t=$(( $(left) - 30 )); [ $t -lt 30 ] && { echo "no time for $1 $2"; return; }
  local start=$SECONDS
  timeout $t .gpu/bin/pio-bench --host $PIO --config /tmp/kv_$1.toml --model $CK --random-weights --prompt-tokens $3 --new-tokens $4 \
    --batch $5 --runs $6 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" --out $OUT/pio_$1_$2.json 2> $OUT/pio_$1_$2_stderr.txt
  echo "pio-bench $1 $2: exit $? after $(( SECONDS - start )) s"
  python3 - $OUT/pio_$1_$2.json <<'PY' 2>/dev/null || tail -3 $OUT/pio_$1_$2_stderr.txt
import json, sys
d = json.load(open(sys.argv[1]))
p = d["processes"][0]
keys = ["batch", "prompt_tokens", "median_prefill_tokens_per_s", "median_steady_decode_tokens_per_s", "peak_gpu_mib"]
out = {k: d.get(k) for k in keys}
out.update({k: p.get(k) for k in ("kv_cache_dtype", "kv_cache_blocks", "kv_block_tokens", "kv_cache_bytes")})
if p.get("kv_cache_blocks") and p.get("kv_block_tokens"):
    out["sequences_of_8192_that_fit"] = p["kv_cache_blocks"] * p["kv_block_tokens"] // 8192
print(json.dumps(out))
PY
}
if has ours; then
  [ -f /tmp/kl_ids.txt ] || python3 -c "import random; r=random.Random(7); print(','.join(str(r.randrange(100, 151000)) for _ in range(512)))" > /tmp/kl_ids.txt
  # The divergence first (it checks the cache's values), then the speeds.
  for kv in $KVS; do
    t=$(( $(left) - 30 ))
    [ $t -gt 30 ] && timeout $t $PIO score $PD --config /tmp/kv_$kv.toml --model $CK --random-weights --device cuda --dtype bf16 \
      --prompt-ids "$(cat /tmp/kl_ids.txt)" --json > /tmp/score_kv_$kv.json 2> /tmp/score_kv_$kv.err || tail -2 /tmp/score_kv_$kv.err
  done
  for kv in $KVS; do
    [ $kv != bf16 ] && [ -s /tmp/score_kv_$kv.json ] && timeout 120 python3 benches/gpu/kl_from_scores.py /tmp/score_kv_bf16.json /tmp/score_kv_$kv.json | tee $OUT/score_kl_$kv.json
  done
  for c in ${CASES:-b1 b32 l8k}; do
    for kv in $KVS; do
      case $c in
        b1) bench $kv b1 128 256 1 2 ;;
        b32) bench $kv b32 128 128 32 2 ;;
        l8k) bench $kv l8k 8192 128 1 2 ;;
      esac
    done
  done
  echo "ours done at $SECONDS s"
fi

python3 - "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" <<'PY'
import glob, json, os, sys
o = os.environ["OUT"]
out = {"commit": sys.argv[1], "device": open(o + "/device.txt").read().strip()}
for path in sorted(glob.glob(o + "/pio_*.json")):
    try:
        out[os.path.basename(path)[4:-5]] = json.load(open(path))
    except Exception as e:
        out[os.path.basename(path)[4:-5]] = {"error": str(e)}
for kv in ("int8", "fp8"):
    if os.path.exists(o + f"/score_kl_{kv}.json"):
        try:
            out[f"divergence_{kv}_kv_from_bf16"] = json.load(open(o + f"/score_kl_{kv}.json"))
        except Exception:
            pass
json.dump(out, open(o + "/results.json", "w"), indent=1)
PY
timeout 60 python3 benches/gpu/plot_kv_int8.py $OUT/results.json $OUT/kv_int8.png || echo "no plot"
echo "done at $SECONDS s"
(cd $OUT && ls pio_*.json >/dev/null 2>&1 && tar czf runs.tgz pio_*.json pio_*_stderr.txt 2>/dev/null && rm -f pio_*.json pio_*_stderr.txt)
