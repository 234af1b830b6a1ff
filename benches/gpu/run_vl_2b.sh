#!/usr/bin/env bash
# One device call for Qwen3-VL (issue 19): the tiny fixtures' one-image prompt through the CLI
# on CUDA (f32 and bf16 greedy tokens against transformers'), then Qwen3-VL-2B's real config
# with random bf16 weights saved as a checkpoint both peers load — time to first token of a
# one-image prompt (448x448 and 1344x1344), decode tokens/s after it, the vision tower's share
# and peak GPU memory, ours beside transformers eager in the same call.
# Carried: .gpu/{inference-pio,libqwen3_vl_2b.so}.xz, .gpu/COMMIT.
# Writes $OUT/{log.txt,results.json}. Env: BUDGET (s, default 540).
set -uo pipefail
BUDGET=${BUDGET:-540}
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_vl_2b.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
F=plugins/qwen3-vl-2b/tests/fixtures
left() { echo $(( BUDGET - SECONDS )); }

echo "== tiny fixtures on CUDA"
for m in vl-tiny-a vl-tiny-b; do
  for dt in f32 bf16; do vl_tiny_one_image $m $dt; done
done

echo "== Qwen3-VL-2B real config, random bf16 weights (at $SECONDS s)"
CK=/tmp/vl2b
qwen3_vl_2b_dir $CK
# The config alone (no weights) loads with --random-weights and answers an image prompt.
timeout 120 $PIO run $PD --model $CK --random-weights --image $F/image-48x80.png --prompt "What is this?" --device cuda \
  --greedy --ignore-eos --max-new-tokens 8 --json > /tmp/rw.json 2> /tmp/rw.err
echo "random-weights run: exit $? $(python3 -c 'import json; d=json.load(open("/tmp/rw.json")); print(len(d["prompt_token_ids"]), "prompt tokens,", len(d["token_ids"]), "new")' 2>&1)"
tail -2 /tmp/rw.err
python3 - $CK <<'PY'
import sys, torch
from PIL import Image
import numpy as np
from transformers import AutoConfig, Qwen3VLForConditionalGeneration
out = sys.argv[1]
config = AutoConfig.from_pretrained(out)
torch.manual_seed(0)
with torch.device("cuda"):
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
rng = np.random.RandomState(0)
for side in (448, 1344):
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side) % 256], -1) + rng.randint(0, 16, (side, side, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f"/tmp/img{side}.png")
print("checkpoint and images ready")
PY
echo "checkpoint ready at $SECONDS s"
# An 8 GB KV cache (not 90 % of the device) so peak memory compares; no prefix caching, so
# the repeated runs encode the image each time.
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
# GPU memory in use, sampled every 50 ms, for the peak of each run.
peak() { # name cmd...
  local name=$1; shift
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.05; done ) < /dev/null > /tmp/mem.$name &
  local sampler=$!
  "$@"; local rc=$?
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
  # (Not to stdout: the caller's redirection of this call would take it.)
  echo "$name: exit $rc, peak GPU memory $(sort -n /tmp/mem.$name | tail -1) MiB" >> /tmp/peaks.txt
}
for side in 448 1344; do
  t=$(( $(left) - 200 )); [ $t -lt 30 ] && { echo "no time for ours $side"; continue; }
  peak ours$side timeout $t $PIO run $PD --config /tmp/vl.toml --model $CK --image /tmp/img$side.png --prompt "Describe this image." \
    --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 128 --json --repeat 3 > /tmp/ours$side.json 2> /tmp/ours$side.err
  tail -2 /tmp/ours$side.err
done
# Text only, same question: the prefill without the image.
timeout 60 $PIO run $PD --config /tmp/vl.toml --model $CK --prompt "Describe this image." --device cuda --dtype bf16 --greedy \
  --ignore-eos --max-new-tokens 128 --json --repeat 3 > /tmp/ours_text.json 2> /tmp/ours_text.err || tail -2 /tmp/ours_text.err
echo "ours done at $SECONDS s"
t=$(( $(left) - 15 ))
[ $t -gt 30 ] && peak transformers timeout $t python3 - $CK <<'PY'
import json, sys, time, torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen3VLForConditionalGeneration
ck = sys.argv[1]
model = Qwen3VLForConditionalGeneration.from_pretrained(ck, dtype=torch.bfloat16, attn_implementation="eager").to("cuda").eval()
tok = AutoTokenizer.from_pretrained(ck)
tok.chat_template = json.load(open(f"{ck}/chat_template.json"))["chat_template"]
proc = Qwen2VLImageProcessor.from_pretrained(ck)
pad = model.config.image_token_id
out = {}
def sync():
    torch.cuda.synchronize()
for side in (448, 1344):
    img = Image.open(f"/tmp/img{side}.png").convert("RGB")
    p = proc(images=[img], return_tensors="pt")
    grid = p["image_grid_thw"]
    n = int(grid.prod()) // 4
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
                                   tokenize=False, add_generation_prompt=True)
    ids = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        ids += [t] * n if t == pad else [t]
    inputs = {"input_ids": torch.tensor([ids], device="cuda"), "pixel_values": p["pixel_values"].to("cuda", torch.bfloat16),
              "image_grid_thw": grid.to("cuda")}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == pad).int()
    r = {"prompt_tokens": len(ids), "image_tokens": n}
    with torch.no_grad():
        for rep in range(3):
            sync(); t0 = time.perf_counter()
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            sync(); r["vision_s"] = time.perf_counter() - t0
            sync(); t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            sync(); r["ttft_s"] = time.perf_counter() - t0
            sync(); t0 = time.perf_counter()
            g = model.generate(**inputs, max_new_tokens=128, min_new_tokens=128, do_sample=False)
            sync(); total = time.perf_counter() - t0
            r["decode_tokens_per_s"] = 127 / (total - r["ttft_s"])
        r["greedy_first8"] = g[0, len(ids):len(ids) + 8].tolist()
    out[str(side)] = r
    print(side, r, flush=True)
json.dump(out, open("/tmp/peer_transformers.json", "w"))
PY
cat /tmp/peaks.txt
python3 - "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" <<'PY'
import json, os, sys
out = {"commit": sys.argv[1], "device": open(os.environ["OUT"] + "/device.txt").read().strip()}
for name in ("ours448", "ours1344", "ours_text"):
    try:
        d = json.load(open(f"/tmp/{name}.json"))
    except Exception as e:
        out[name] = {"error": str(e)}
        continue
    t = d["timings"]
    out[name] = {"prompt_tokens": t["prompt_tokens"], "ttft_s": t["time_to_first_token_s"], "decode_tokens_per_s": t["decode_tokens_per_s"],
                 "steady_decode_tokens_per_s": t.get("steady_decode_tokens_per_s"), "first8": d["token_ids"][:8],
                 "runs_ttft_s": [r["time_to_first_token_s"] for r in d.get("runs", [])]}
for name in ("ours448", "ours1344", "transformers"):
    try:
        out.setdefault("peak_mib", {})[name] = max(int(x) for x in open(f"/tmp/mem.{name}").read().split())
    except Exception:
        pass
if os.path.exists("/tmp/peer_transformers.json"):
    out["peer_transformers"] = json.load(open("/tmp/peer_transformers.json"))
json.dump(out, open(os.environ["OUT"] + "/results.json", "w"), indent=1)
print(json.dumps(out, indent=1)[:5000])
PY
echo "done at $SECONDS s"
