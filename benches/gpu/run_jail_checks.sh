#!/usr/bin/env bash
# One device call: the worker jail (issue 25) on the H200 with CUDA.
# 1. `plugins info` of the Qwen3 plugin at `maximum`: every mechanism as the jailed worker
#    reports it (this machine's cgroup v2 delegates only `memory`, so `pids.max` is missing and
#    the configs say allow_degraded; every other mechanism must be [on ]).
# 2. The tiny Qwen3 fixture on CUDA (f32, greedy, 32 tokens) at low and maximum.
# 3. Qwen3-4B (real config, --random-weights, bf16, kv_cache_gb = 4), batch 1, 128 tokens,
#    low and maximum alternating twice: tokens, time to first token, decode speed.
# 4. A 16-row prompts file (Qwen3-4B, 24 tokens) at low and maximum: rows identical.
# 5. strace -f of the jailed worker: at `maximum` (calls the allowlist refused, if any: EPERM
#    lines) and at `high` (the calls a jailed worker makes, for seccomp/recorded/).
# (The attacks of the hostile plugin ran in the previous call: checks/attacks.txt.)
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz, .gpu/strace/.
# Writes $OUT/{log.txt,info_maximum.txt,results.json,cuda_jailed.txt,refused.txt}.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
cat .gpu/COMMIT; uname -r; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ls -la /usr/local/ | grep -i cuda; readlink -f /usr/local/cuda
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
SHA=$(sha256sum .gpu/bin/libqwen3_4b_instruct_2507.so | cut -d' ' -f1)
rm -rf /tmp/tiny /tmp/q4b && cp -rL $P/tests/fixtures/qwen3-tiny-a /tmp/tiny
mkdir -p /tmp/q4b && cp $P/primary/config.json /tmp/q4b/ && cp -L $P/tests/fixtures/qwen3-tokenizer/* /tmp/q4b/
chmod -R o+rX /tmp/tiny /tmp/q4b
R=/tmp/runs && rm -rf $R && mkdir -p $R
printf '[plugins.%s]\nkv_cache_gb = 4\n' $ID > /tmp/low.toml
for level in high maximum; do
  printf '[plugins.%s]\nkv_cache_gb = 4\nsecurity = "%s"\nallow_degraded = true\ntimeout_s = 300\nsha256 = "%s"\n' $ID $level $SHA > /tmp/$level.toml
done
M() { echo "== $* at $SECONDS s"; }
summary() {
python3 - $R $OUT <<'PY'
import json, sys, statistics, glob, os
runs, out = sys.argv[1], sys.argv[2]
def load(p):
    try: return json.load(open(p))
    except Exception: return None
res = {}
for f in sorted(glob.glob(f"{runs}/*.json")):
    d = load(f); name = os.path.basename(f)[:-5]
    if d is None: res[name] = None; continue
    if "rows" in d:
        res[name] = {"rows": [r["token_ids"] for r in d["rows"]], "timings": {k: v for k, v in d.items() if k not in ("rows", "model", "plugin")}}
    else:
        res[name] = {"token_ids": d["token_ids"], "timings": d["timings"]}
def same(a, b):
    return a in res and b in res and res[a] is not None and res[b] is not None and res[a].get("token_ids", res[a].get("rows")) == res[b].get("token_ids", res[b].get("rows"))
checks = {"tiny maximum == low": same("tiny_maximum", "tiny_low"), "b16 maximum == low": same("b16_maximum", "b16_low")}
for i in (1, 2):
    checks[f"q4b {i} maximum == low"] = same(f"q4b_maximum_{i}", "q4b_low_1")
for k in ("decode_tokens_per_s", "steady_decode_tokens_per_s", "time_to_first_token_s"):
    for lvl in ("low", "maximum"):
        v = [res[f"q4b_{lvl}_{i}"]["timings"].get(k) for i in (1, 2) if res.get(f"q4b_{lvl}_{i}")]
        checks[f"q4b {lvl} {k}"] = v
    lo, mx = checks[f"q4b low {k}"], checks[f"q4b maximum {k}"]
    if lo and mx and all(x is not None for x in lo + mx):
        checks[f"q4b maximum/low {k}"] = statistics.mean(mx) / statistics.mean(lo)
for k, v in checks.items(): print(k, v)
json.dump({"checks": checks, "runs": {k: (v and v.get("timings")) for k, v in res.items()}}, open(f"{out}/results.json", "w"), indent=1)
PY
}
run() { local name=$1 level=$2; shift 2; timeout 200 $PIO --config /tmp/$level.toml run $PD "$@" --json > $R/$name.json 2> $R/$name.err; echo "$name exit $?"; grep -v "^warning" $R/$name.err | tail -n 4 | cut -c1-300; }

M info; timeout 120 $PIO --config /tmp/maximum.toml $PD plugins info $ID > $OUT/info_maximum.txt 2>&1; grep -E "^\s+\[|in force" $OUT/info_maximum.txt | cut -c1-400
M tiny
for level in low maximum; do run tiny_$level $level --model /tmp/tiny --prompt-ids 1,2,3,4 --device cuda --dtype f32 --greedy --max-new-tokens 32; done
summary
M q4b_b1
IDS=$(python3 -c "import random; r=random.Random(0); print(','.join(str(r.randrange(100,151000)) for _ in range(128)))")
for i in 1 2; do for level in low maximum; do
  run q4b_${level}_$i $level --model /tmp/q4b --random-weights --prompt-ids $IDS --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 128
done; done
summary
M q4b_b16
python3 -c "
import random; r=random.Random(1)
open('/tmp/p16.jsonl','w').write(''.join(str([r.randrange(100,151000) for _ in range(64)])+'\n' for _ in range(16)))"
for level in low maximum; do run b16_$level $level --model /tmp/q4b --random-weights --prompts-file /tmp/p16.jsonl --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 24; done
summary

M strace
mkdir -p /tmp/traces
timeout 150 benches/gpu/strace_carried.sh -f -qq -o /tmp/traces/max.trace $PIO --config /tmp/maximum.toml run $PD --model /tmp/q4b --random-weights --prompt-ids 1,2,3,4,5,6,7,8 --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 48 > /dev/null 2>&1; echo "strace maximum exit $?"
grep -h "= -1 EPERM" /tmp/traces/max.trace | sed -E 's/^[0-9]+ +//; s/\(.*//' | sort | uniq -c > $OUT/refused.txt; echo "refused at maximum:"; cat $OUT/refused.txt
timeout 120 benches/gpu/strace_carried.sh -f -qq -o /tmp/traces/high.trace $PIO --config /tmp/high.toml run $PD --model /tmp/q4b --random-weights --prompt-ids 1,2,3,4,5,6,7,8 --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 48 > /dev/null 2>&1; echo "strace high exit $?"
python3 inference-pio-host/seccomp/worker_syscalls.py /tmp/traces/high.trace > $OUT/cuda_jailed.txt
wc -l < $OUT/cuda_jailed.txt; tr '\n' ' ' < $OUT/cuda_jailed.txt; echo
echo "used $SECONDS s"
