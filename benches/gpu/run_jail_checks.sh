#!/usr/bin/env bash
# One device call: the worker jail (issue 25) on the H200 with CUDA.
# 1. `plugins info` of the Qwen3 plugin at `maximum`: every mechanism as the jailed worker
#    reports it (this machine's cgroup v2 delegates only `memory`, so `pids.max` is missing and
#    the configs say allow_degraded; every other mechanism must be [on ]).
# 2. The tiny Qwen3 fixture on CUDA (f32, greedy, 32 tokens) at low, high and maximum.
# 3. Qwen3-4B (real config, --random-weights, bf16), batch 1, 128 tokens, low and maximum
#    alternating three times: tokens, time to first token, decode speed.
# 4. A 16-row prompts file on CUDA (Qwen3-4B, 24 tokens) at low and maximum: rows identical.
# 5. The hostile test plugin's attacks at high and maximum on this machine (a decoy process,
#    a pathname and an abstract UNIX socket listening outside).
# 6. strace -f of the jailed worker at `high` (no allowlist) on CUDA: the system calls the
#    worker makes after jailing itself, for inference-pio-host/seccomp/recorded/.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so,libpio_test_plugin_hostile.so}.xz,
# .gpu/strace/. Writes $OUT/{log.txt,info_maximum.txt,results.json,attacks.txt,cuda_jailed.txt}.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so libpio_test_plugin_hostile.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
cat .gpu/COMMIT; uname -r; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
SHA=$(sha256sum .gpu/bin/libqwen3_4b_instruct_2507.so | cut -d' ' -f1)
HSHA=$(sha256sum .gpu/bin/libpio_test_plugin_hostile.so | cut -d' ' -f1)
rm -rf /tmp/tiny /tmp/q4b && cp -rL $P/tests/fixtures/qwen3-tiny-a /tmp/tiny
mkdir -p /tmp/q4b && cp $P/primary/config.json /tmp/q4b/ && cp -L $P/tests/fixtures/qwen3-tokenizer/* /tmp/q4b/
chmod -R o+rX /tmp/tiny /tmp/q4b
printf '' > /tmp/low.toml
for level in high maximum; do
  printf '[plugins.%s]\nsecurity = "%s"\nallow_degraded = true\ntimeout_s = 300\nsha256 = "%s"\n[plugins.test-hostile]\nsecurity = "%s"\nallow_degraded = true\ntimeout_s = 20\nsha256 = "%s"\n' $ID $level $SHA $level $HSHA > /tmp/$level.toml
done
M() { echo "== $* at $SECONDS s"; }

M info; timeout 120 $PIO --config /tmp/maximum.toml $PD plugins info $ID > $OUT/info_maximum.txt 2>&1; grep -E "^\s+\[|in force" $OUT/info_maximum.txt | cut -c1-220

M tiny
for level in low high maximum; do
  timeout 120 $PIO --config /tmp/$level.toml run $PD --model /tmp/tiny --prompt-ids 1,2,3,4 --device cuda --dtype f32 --greedy --max-new-tokens 32 --json > $OUT/tiny_$level.json 2> $OUT/tiny_$level.err; echo "tiny $level exit $?"; tail -n 3 $OUT/tiny_$level.err | cut -c1-300
done

M q4b_b1
IDS=$(python3 -c "import random; r=random.Random(0); print(','.join(str(r.randrange(100,151000)) for _ in range(128)))")
for i in 1 2 3; do for level in low maximum; do
  timeout 240 $PIO --config /tmp/$level.toml run $PD --model /tmp/q4b --random-weights --prompt-ids $IDS --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 128 --json > $OUT/q4b_${level}_$i.json 2> $OUT/q4b_${level}_$i.err
  echo "q4b $level $i exit $?"; tail -n 2 $OUT/q4b_${level}_$i.err | cut -c1-300
done; done

M q4b_b16
python3 -c "
import random; r=random.Random(1)
open('/tmp/p16.jsonl','w').write(''.join(str([r.randrange(100,151000) for _ in range(64)])+'\n' for _ in range(16)))"
for level in low maximum; do
  timeout 240 $PIO --config /tmp/$level.toml run $PD --model /tmp/q4b --random-weights --prompts-file /tmp/p16.jsonl --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 24 --json > $OUT/b16_$level.json 2> $OUT/b16_$level.err
  echo "b16 $level exit $?"; tail -n 2 $OUT/b16_$level.err | cut -c1-300
done

M attacks
mkdir -p /tmp/hm && echo '{"architectures": ["PioTestHostileForCausalLM"]}' > /tmp/hm/config.json && chmod -R o+rX /tmp/hm
sleep 600 & DECOY=$!
python3 -c "
import socket, os, time
s = socket.socket(socket.AF_UNIX); s.bind('/tmp/jail-control.sock'); s.listen(5)
a = socket.socket(socket.AF_UNIX); a.bind('\0pio-jail-abstract'); a.listen(5)
s.settimeout(120); a.settimeout(0.1)
try:
    c, _ = s.accept(); print('LISTENER REACHED', flush=True)
except Exception: pass
" & LISTENER=$!
sleep 0.5
{
for level in high maximum; do
  echo "=== $level"
  for a in ids proc-pids kill-parent kill:$DECOY kill:$$ kill:-1 unix-connect:/tmp/jail-control.sock abstract-connect:pio-jail-abstract exec:/bin/sh print:PIO-MARKER setuid:0 init-module finit-module read:/proc/1/environ read:/etc/passwd connect:127.0.0.1:22 ptrace name-thread echo; do
    printf "%-40s " "$a"
    timeout 60 $PIO --config /tmp/$level.toml $PD run --model /tmp/hm --plugin test-hostile --raw --prompt "$a" --json > /tmp/a.out 2> /tmp/a.err
    python3 -c "import json; print(json.load(open('/tmp/a.out'))['text'])" 2>/dev/null || { echo "FAILED"; grep -v "^warning" /tmp/a.err | head -3; }
    grep -h "PIO-MARKER" /tmp/a.out /tmp/a.err
  done
done
kill -0 $DECOY && echo "decoy alive"; kill $DECOY
} > $OUT/attacks.txt 2>&1
cat $OUT/attacks.txt

M strace
ST() { .gpu/strace/ld-linux-x86-64.so.2 --library-path .gpu/strace .gpu/strace/strace "$@"; }
mkdir -p /tmp/traces
ST -f -qq -o /tmp/traces/j1.trace $PIO --config /tmp/high.toml run $PD --model /tmp/tiny --prompt-ids 1,2,3,4 --device cuda --dtype f32 --greedy --max-new-tokens 16 > /dev/null 2>&1; echo "strace tiny exit $?"
ST -f -qq -o /tmp/traces/j2.trace $PIO --config /tmp/high.toml run $PD --model /tmp/q4b --random-weights --prompt-ids 1,2,3,4,5,6,7,8 --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 48 > /dev/null 2>&1; echo "strace q4b exit $?"
ST -f -qq -o /tmp/traces/j3.trace $PIO --config /tmp/high.toml run $PD --model /tmp/q4b --random-weights --prompts-file /tmp/p16.jsonl --device cuda --dtype bf16 --max-new-tokens 24 --ignore-eos --json > /dev/null 2>&1; echo "strace b16 exit $?"
python3 inference-pio-host/seccomp/worker_syscalls.py /tmp/traces/*.trace > $OUT/cuda_jailed.txt
wc -l < $OUT/cuda_jailed.txt; tr '\n' ' ' < $OUT/cuda_jailed.txt; echo

M summary
python3 - $OUT <<'PY'
import json, sys, statistics, glob, os
out = sys.argv[1]
def load(p):
    try: return json.load(open(p))
    except Exception as e: return None
res = {"tiny": {}, "q4b_b1": {}, "b16": {}}
for l in ["low", "high", "maximum"]:
    d = load(f"{out}/tiny_{l}.json"); res["tiny"][l] = d and d["token_ids"]
print("tiny tokens equal across levels:", len({json.dumps(v) for v in res["tiny"].values()}) == 1 and None not in res["tiny"].values())
for l in ["low", "maximum"]:
    runs = [load(f"{out}/q4b_{l}_{i}.json") for i in (1, 2, 3)]
    runs = [r for r in runs if r]
    res["q4b_b1"][l] = {
        "decode_tok_s": [r["timings"]["decode_tokens_per_s"] for r in runs],
        "ttft_s": [r["timings"]["time_to_first_token_s"] for r in runs],
        "tokens": [r["token_ids"] for r in runs],
    }
low, mx = res["q4b_b1"]["low"], res["q4b_b1"]["maximum"]
if low["decode_tok_s"] and mx["decode_tok_s"]:
    for k in ["decode_tok_s", "ttft_s"]:
        a, b = statistics.mean(low[k]), statistics.mean(mx[k])
        print(f"q4b b1 {k}: low {low[k]} mean {a:.4g}; maximum {mx[k]} mean {b:.4g}; maximum/low {b/a:.4f}")
    print("q4b b1 tokens identical:", all(t == low["tokens"][0] for t in low["tokens"] + mx["tokens"]))
for l in ["low", "maximum"]:
    d = load(f"{out}/b16_{l}.json"); res["b16"][l] = d and [r["token_ids"] for r in d["rows"]]
print("b16 rows identical:", res["b16"]["low"] is not None and res["b16"]["low"] == res["b16"]["maximum"])
for r in res["q4b_b1"].values(): r.pop("tokens", None)
res["tiny"] = {k: (v is not None) for k, v in res["tiny"].items()}
res["b16"] = {k: (v is not None) for k, v in res["b16"].items()}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
PY
echo "used $SECONDS s"
