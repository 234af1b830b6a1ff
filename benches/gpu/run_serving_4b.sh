#!/usr/bin/env bash
# One device call for the serving core (continuous batching over the paged KV cache): the
# sliding-window fixture made by transformers (CPU), tiny-model parity on CUDA through the CLI,
# then Qwen3-4B (real config, random bf16 weights saved as a checkpoint all peers load) —
# batch-1 and batch-32 decode, the offline throughput workload (256 requests x 512 random
# prompt tokens, 128 new tokens, submitted at once) and the shared-prefix workload (64 requests
# sharing a 2,048-token system prompt + 64 distinct tokens, 32 new) with prefix caching on and
# off — beside transformers' continuous batching (`generate_batch`, run first among the peers,
# while the build goes on) and, when its build (started at the beginning, in the background) is
# done in time, llama.cpp's batched-bench on the same checkpoint as GGUF BF16: all three fit one
# 585 s call on an H100 if the peers stage follows `OURS="b1 offline prefix_off prefix_on"`, but
# then our runs share the machine with the build (2026-12-06: 1.15x llama.cpp there against
# 1.28-1.34x on a quiet machine); for equal terms run STAGES=prepare first, then "ours peers".
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz, .gpu/COMMIT, .gpu/peers/.
# Writes $OUT/{log.txt,results.json,sw/*} (sw: the qwen3-tiny-sw fixture to commit).
# Env: BUDGET (s, default 570), STAGES (default "fixture parity ours peers"; "prepare" alone builds
# llama.cpp, saves the checkpoint and its GGUF and waits for them, for a quiet "ours peers" call
# next on the same held machine), OURS (which of
# our runs, default "b1 b32 offline offline_sync prefix_off prefix_on"), PEERS (default "transformers
# llama"; llama.cpp runs only if its build was started, i.e. with the peers stage), PIO_LOG (default 1, or "steps":
# phase log).
set -uo pipefail
BUDGET=${BUDGET:-570}
STAGES=${STAGES:-fixture parity ours peers}
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
# llama.cpp's build gets the cores from 4 up and our runs (and transformers) cores 0-3: a build
# on every core halved our host-bound batch-1 decode in the 2026-12-03 peers call
# (serving-peers.md), and on cores 6-15 beside transformers it took about 470 s (2026-12-06).
CORES=$(nproc)
OURS_CPUS=${OURS_CPUS:-0-3}
BUILD_CPUS=4-$(( CORES - 1 ))
# STAGES="prepare" (a call of its own, before "ours peers" on the same held machine): the build
# on every core, the checkpoint and its GGUF, nothing timed; it waits for all three, so the
# next call measures the three engines on a quiet machine.
[[ " $STAGES " == *" prepare "* ]] && BUILD_CPUS=0-$(( CORES - 1 ))
[ -f .gpu/peers/build_llamacpp.sh ] && [[ " $STAGES " == *" peers "* || " $STAGES " == *" prepare "* ]] && taskset -c $BUILD_CPUS bash .gpu/peers/build_llamacpp.sh /tmp/llama.cpp
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET - SECONDS )); }

if has fixture; then
  (cd $P/tests/fixtures && python3 make_fixtures.py --only qwen3-tiny-sw) 2>&1 | tail -3
  mkdir -p $OUT/sw
  cp $P/tests/fixtures/qwen3-tiny-sw/{config.json,generation_config.json,model.safetensors} $P/tests/fixtures/qwen3-tiny-sw.reference.json $OUT/sw/
  echo "fixture done at $SECONDS s"
fi
if has parity; then
  gpu_parity $P/tests/fixtures qwen3-tiny-b f32 bf16
  [ -f $P/tests/fixtures/qwen3-tiny-sw.reference.json ] && gpu_parity $P/tests/fixtures qwen3-tiny-sw f32 bf16
  echo "parity done at $SECONDS s"
fi

CK=/tmp/q4b
if has ours || has peers || has prepare; then
  [ -f $CK/model.safetensors.index.json ] || [ -f $CK/model.safetensors ] || \
    python3 benches/gpu/make_random_checkpoint.py $P/primary/config.json $P/tests/fixtures/qwen3-tokenizer $CK 2>&1 | tail -1
  python3 - <<'PY'
import json, random
r = random.Random(0)
with open("/tmp/offline.jsonl", "w") as f:
    for _ in range(256):
        f.write(json.dumps([r.randrange(100, 151000) for _ in range(512)]) + "\n")
system = [r.randrange(100, 151000) for _ in range(2048)]
with open("/tmp/prefix.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps(system + [r.randrange(100, 151000) for _ in range(64)]) + "\n")
with open("/tmp/b1.txt", "w") as f:
    f.write(",".join(str(r.randrange(100, 151000)) for _ in range(128)))
PY
  printf '[plugins.%s]\nmax_num_batched_tokens = 8192\n' $ID > /tmp/serve.toml
  printf '[plugins.%s]\nmax_num_batched_tokens = 8192\nprefix_caching = false\n' $ID > /tmp/nocache.toml
  printf '[plugins.%s]\nmax_num_batched_tokens = 8192\nprefix_caching = false\nasync_scheduling = false\n' $ID > /tmp/nocache_sync.toml
  printf '[plugins.%s]\nmax_num_batched_tokens = 16384\nprefix_caching = false\n' $ID > /tmp/nocache16k.toml
  echo "checkpoint and prompts ready at $SECONDS s"
  # The GGUF needs only the unpacked source tree (its converter), not the build: converted now, in
  # the background on the build's cores, it is ready when the build is (a conversion started
  # after the build was cut short by the call's end on 2026-12-06).
  if { has peers || has prepare; } && [ -f /tmp/llama.cpp/convert_hf_to_gguf.py ] && [ ! -f /tmp/q4b.gguf.done ] && [ ! -f /tmp/q4b.gguf.started ]; then
    touch /tmp/q4b.gguf.started
    ( PYTHONPATH=/tmp/llama.cpp/gguf-py taskset -c $BUILD_CPUS python3 /tmp/llama.cpp/convert_hf_to_gguf.py $CK --outtype bf16 \
        --outfile /tmp/q4b.gguf > /tmp/q4b.gguf.log 2>&1; echo $? > /tmp/q4b.gguf.done ) &
  fi
fi
if has prepare; then
  while { [ ! -f /tmp/llama.cpp.done ] || [ ! -f /tmp/q4b.gguf.done ]; } && [ $(left) -gt 10 ]; do sleep 2; done
  echo "prepared: llama.cpp build $(cat /tmp/llama.cpp.done 2>/dev/null || echo running), GGUF $(cat /tmp/q4b.gguf.done 2>/dev/null || echo running) at $SECONDS s"
fi
ours() { # name config args...
  local name=$1 config=$2; shift 2
  [[ " ${OURS:-b1 b32 offline offline_sync prefix_off prefix_on} " == *" $name "* ]] || return
  local t=$(( $(left) - 15 )); [ $t -lt 20 ] && { echo "no time for $name"; return; }
  local start=$SECONDS
  RUST_BACKTRACE=1 INFERENCE_PIO_LOG=${PIO_LOG:-1} timeout $t taskset -c $OURS_CPUS $PIO run $PD --config $config --model $CK --device cuda --dtype bf16 --greedy --ignore-eos --json "$@" \
    > /tmp/ours_$name.json 2> /tmp/ours_$name.err
  echo "ours $name: exit $? after $(( SECONDS - start )) s"; tail -2 /tmp/ours_$name.err
  grep -a -m2 -A4 "panicked" /tmp/ours_$name.err
  grep -a -m1 "KV cache:" /tmp/ours_$name.err
  grep -a -m4 -i "graph\|panick\|recording\|decode steps" /tmp/ours_$name.err
  grep -a "steps:" /tmp/ours_$name.err | tail -3
}
if has ours; then
  ours b1 /tmp/serve.toml --prompt-ids "$(cat /tmp/b1.txt)" --max-new-tokens 256 --repeat 3
  # Not in the default list: batch 1 over a long generation (contexts to 2,176 tokens, so the
  # recorded step's width grows several times).
  ours b1_long /tmp/serve.toml --prompt-ids "$(cat /tmp/b1.txt)" --max-new-tokens 2048 --repeat 2
  ours b32 /tmp/serve.toml --prompt-ids "$(cat /tmp/b1.txt)" --max-new-tokens 128 --batch 32 --repeat 2
  ours offline /tmp/nocache.toml --prompts-file /tmp/offline.jsonl --max-new-tokens 128 --repeat 2
  # The same workload with every step read back before the next is scheduled (A/B), and
  # whether the two picked the same tokens.
  ours offline_sync /tmp/nocache_sync.toml --prompts-file /tmp/offline.jsonl --max-new-tokens 128 --repeat 2
  [ -f /tmp/ours_offline.json ] && [ -f /tmp/ours_offline_sync.json ] && python3 - <<'PY'
import json
a, b = (json.load(open(f"/tmp/ours_{n}.json")) for n in ("offline", "offline_sync"))
ra, rb = a.get("rows") or [], b.get("rows") or []
same = sum(x["token_ids"] == y["token_ids"] for x, y in zip(ra, rb))
print(f"offline async vs sync: {same} of {len(ra)} requests with identical tokens")
PY
  # Not in the default list: the offline workload with twice the step's token budget.
  ours offline_16k /tmp/nocache16k.toml --prompts-file /tmp/offline.jsonl --max-new-tokens 128 --repeat 2
  ours prefix_off /tmp/nocache.toml --prompts-file /tmp/prefix.jsonl --max-new-tokens 32 --repeat 2
  ours prefix_on /tmp/serve.toml --prompts-file /tmp/prefix.jsonl --max-new-tokens 32 --repeat 2
fi
if has peers; then
  wants() { [[ " ${PEERS:-transformers llama} " == *" $1 "* ]]; }
  # transformers first, on our cores, while llama.cpp's build finishes on the others: after the
  # build, in one 585 s call, no time was left for transformers (2026-12-06, H100). It leaves
  # llama.cpp 110 s (both benchmarks took about 50; the GGUF is converted during our runs).
  if wants transformers; then
    t=$(( $(left) - 40 ))
    [ -f /tmp/llama.cpp.started ] && wants llama && t=$(( $(left) - 110 ))
    [ $t -gt 60 ] && timeout $t taskset -c $OURS_CPUS python3 benches/gpu/peer_transformers_cb.py $CK /tmp/offline.jsonl 128 /tmp/peer_transformers.json 2>&1 | tail -3
    echo "transformers done at $SECONDS s"
  fi
  if wants llama && [ -f /tmp/llama.cpp.started ]; then
    while [ ! -f /tmp/llama.cpp.done ] && [ $(left) -gt 60 ]; do sleep 2; done
    while [ ! -f /tmp/q4b.gguf.done ] && [ $(left) -gt 60 ]; do sleep 2; done
    echo "llama.cpp build: $(cat /tmp/llama.cpp.done 2>/dev/null || echo running), GGUF: $(cat /tmp/q4b.gguf.done 2>/dev/null || echo running) at $SECONDS s"
    if [ "$(cat /tmp/llama.cpp.done 2>/dev/null)" = 0 ] && [ "$(cat /tmp/q4b.gguf.done 2>/dev/null)" = 0 ]; then
      B=/tmp/llama.cpp/build/bin
      timeout $(( $(left) - 15 )) $B/llama-batched-bench -m /tmp/q4b.gguf -ngl 99 -fa on -c 170000 -b 8192 -ub 2048 \
        -npp 512 -ntg 128 -npl 256 > /tmp/llama_batched.txt 2>&1; tail -6 /tmp/llama_batched.txt
      [ $(left) -gt 45 ] && timeout $(( $(left) - 15 )) $B/llama-bench -m /tmp/q4b.gguf -ngl 99 -fa 1 -p 0 -n 128 > /tmp/llama_bench.txt 2>&1; tail -4 /tmp/llama_bench.txt
    else
      echo "llama.cpp build not done (status $(cat /tmp/llama.cpp.done 2>/dev/null || echo running)) at $SECONDS s"
    fi
  fi
  echo "llama.cpp done at $SECONDS s"
fi
python3 - "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" <<'PY'
import glob, json, os, re, sys
out = {"commit": sys.argv[1], "device": open(os.environ["OUT"] + "/device.txt").read().strip()}
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else None
for path in sorted(glob.glob("/tmp/ours_*.json")):
    name = path[len("/tmp/ours_"):-5]
    try:
        d = json.load(open(path))
    except Exception as e:
        out[name] = {"error": str(e)}
        continue
    t = d["timings"]
    rows = d.get("rows") or [{"timings": t, "token_ids": d["token_ids"]}]
    ttft = [r["timings"]["time_to_first_token_s"] for r in rows]
    gen = sum(len(r["token_ids"]) for r in rows)
    prompt = t["prompt_tokens"]
    out[name] = {
        "requests": len(rows), "prompt_tokens": prompt, "output_tokens": gen, "total_s": t["total_s"],
        "output_tokens_per_s": gen / t["total_s"], "total_tokens_per_s": (gen + prompt) / t["total_s"],
        "mean_ttft_s": sum(ttft) / len(ttft), "p99_ttft_s": pct(ttft, 99),
        "decode_tokens_per_s": t["decode_tokens_per_s"], "steady_decode_tokens_per_s": t["steady_decode_tokens_per_s"],
        "cached_prompt_tokens": t.get("cached_prompt_tokens"), "kv_cache_bytes": d["model"].get("kv_cache_bytes"),
        "kv_cache_blocks": d["model"].get("kv_cache_blocks"), "kv_blocks_used_at_end": t.get("kv_blocks_used"),
        "stats": d.get("stats"), "runs": d.get("runs"),
    }
if os.path.exists("/tmp/peer_transformers.json"):
    out["peer_transformers"] = json.load(open("/tmp/peer_transformers.json"))
for f in ("/tmp/llama_batched.txt", "/tmp/llama_bench.txt"):
    if os.path.exists(f):
        out["peer_" + os.path.basename(f)[:-4]] = [l for l in open(f).read().splitlines() if l.startswith("|")]
json.dump(out, open(os.environ["OUT"] + "/results.json", "w"), indent=1)
print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("stats", "runs")} if isinstance(v, dict) else v for k, v in out.items()}, indent=1)[:6000])
PY
echo "done at $SECONDS s"
