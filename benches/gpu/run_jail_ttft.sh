#!/usr/bin/env bash
# One device call: time to first token and decode speed of Qwen3-4B (--random-weights, bf16,
# batch 1, 128 tokens, kv_cache_gb = 4) in-process (`low`) against the jailed worker
# (`maximum`), alternating three times, now that the worker keeps a persistent per-plugin
# cache directory (compiled kernels, CUDA JIT cache) as the in-process run does.
# REPEAT=N (default 1): each process runs the request N times (--repeat); the summary then also
# compares the warm repeats (2..N) of every process.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz. Writes $OUT/{log.txt,results.json}.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
cat .gpu/COMMIT
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
SHA=$(sha256sum .gpu/bin/libqwen3_4b_instruct_2507.so | cut -d' ' -f1)
mkdir -p /tmp/q4b && cp $P/primary/config.json /tmp/q4b/ && cp -L $P/tests/fixtures/qwen3-tokenizer/* /tmp/q4b/ && chmod -R o+rX /tmp/q4b
printf '[plugins.%s]\nkv_cache_gb = 4\nprefix_caching = false\n' $ID > /tmp/low.toml
printf '[plugins.%s]\nkv_cache_gb = 4\nprefix_caching = false\nsecurity = "maximum"\nallow_degraded = true\ntimeout_s = 300\nsha256 = "%s"\n' $ID $SHA > /tmp/maximum.toml
IDS=$(python3 -c "import random; r=random.Random(0); print(','.join(str(r.randrange(100,151000)) for _ in range(128)))")
mkdir -p /tmp/runs
for i in 1 2 3; do for level in low maximum; do
  timeout 200 $PIO --config /tmp/$level.toml run $PD --model /tmp/q4b --random-weights --prompt-ids $IDS --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 128 --json --repeat ${REPEAT:-1} > /tmp/runs/${level}_$i.json 2> /tmp/runs/${level}_$i.err
  echo "$level $i exit $?"; grep -v "^warning" /tmp/runs/${level}_$i.err | tail -n 2 | cut -c1-300
done; done
python3 - $OUT <<'PY'
import json, sys, statistics
out = sys.argv[1]
res = {}
for lvl in ("low", "maximum"):
    runs = [json.load(open(f"/tmp/runs/{lvl}_{i}.json")) for i in (1, 2, 3)]
    res[lvl] = {k: [r["timings"][k] for r in runs] for k in ("time_to_first_token_s", "decode_tokens_per_s", "steady_decode_tokens_per_s")}
    res[lvl]["tokens_equal_low"] = None
low = [json.load(open(f"/tmp/runs/low_{i}.json"))["token_ids"] for i in (1, 2, 3)]
mx = [json.load(open(f"/tmp/runs/maximum_{i}.json"))["token_ids"] for i in (1, 2, 3)]
res["tokens identical"] = all(t == low[0] for t in low + mx)
for k in ("time_to_first_token_s", "decode_tokens_per_s", "steady_decode_tokens_per_s"):
    a, b = statistics.mean(res["low"][k][1:]), statistics.mean(res["maximum"][k][1:])
    res[f"maximum/low {k} (runs 2-3)"] = b / a
warm = {}
for lvl in ("low", "maximum"):
    runs = [json.load(open(f"/tmp/runs/{lvl}_{i}.json")) for i in (1, 2, 3)]
    reps = [t for r in runs for t in r.get("runs", [])[1:]]
    if reps:
        warm[lvl] = {k: statistics.mean(t[k] for t in reps) for k in ("time_to_first_token_s", "decode_tokens_per_s", "steady_decode_tokens_per_s")}
        warm[lvl]["n"] = len(reps)
if len(warm) == 2:
    res["warm repeats"] = warm
    for k in ("time_to_first_token_s", "decode_tokens_per_s", "steady_decode_tokens_per_s"):
        res[f"maximum/low {k} (warm repeats)"] = warm["maximum"][k] / warm["low"][k]
for k, v in res.items(): print(k, v)
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
PY
echo "used $SECONDS s"
