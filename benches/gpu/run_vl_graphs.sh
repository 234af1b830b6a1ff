#!/usr/bin/env bash
# One device call for the vision tower's recorded encodings (issue 19, serve::vision_graph):
# 1. the tiny Qwen3-VL fixtures' one-image prompt on CUDA (f32, bf16; greedy tokens against
#    transformers'), 2. a server on CUDA (vl-tiny-a, f32) asked about image A, then image B (A
#    flipped: the same grid), then A again and B again: A is encoded directly (a grid seen
#    once), B records the grid with its patches, the later two replay it with theirs; each
#    answer against `run` with `cuda_graphs = false` for that image, 3. run_vl_2b.sh (the
#    2B config's time to first token beside transformers eager, same call), 4. the 2B prompts
#    with the plugin before (.gpu/before) and after, alternating, on run_vl_2b.sh's checkpoint.
# Carried: .gpu/{inference-pio,libqwen3_vl_2b.so,qwen3-tokenizer.json}.xz,
# .gpu/before/libqwen3_vl_2b.so.xz, .gpu/COMMIT; the tree holds plugins/qwen3-vl-2b/tests.
# ONLY_CORRECTNESS=1: step 2 only (nothing from .gpu/before needed).
set -uo pipefail
source benches/gpu/lib.sh
restore_qwen3_tokenizer
unpack_gpu_binaries inference-pio libqwen3_vl_2b.so
if [ "${ONLY_CORRECTNESS:-0}" != 1 ]; then
  mkdir -p .gpu/before && xz -dc .gpu/before/libqwen3_vl_2b.so.xz > .gpu/before/libqwen3_vl_2b.so && cp .gpu/bin/inference-pio .gpu/before/
fi
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg
F=plugins/qwen3-vl-2b/tests/fixtures
python3 -c "
from PIL import Image
Image.open('$F/image-40x56.png').convert('RGB').transpose(Image.FLIP_LEFT_RIGHT).save('/tmp/imgB.png')"
printf '[plugins.qwen3-vl-2b]\ncuda_graphs = false\n' > /tmp/nographs.toml
for img in $F/image-40x56.png /tmp/imgB.png; do
  timeout 60 $PIO --config /tmp/nographs.toml run $PD --model $F/vl-tiny-a --image $img --prompt "What is this?" --greedy --max-new-tokens 16 \
    --json --device cuda --dtype f32 > /tmp/direct.$(basename $img).json 2> /tmp/direct.err || tail -3 /tmp/direct.err
done
INFERENCE_PIO_LOG=1 timeout 120 $PIO serve $PD --model $F/vl-tiny-a --served-model-name vl --device cuda --dtype f32 --port 8123 > /tmp/serve.out 2> /tmp/serve.err &
python3 - $F/image-40x56.png /tmp/imgB.png <<'PY' | tee $OUT/server_ab.txt
import base64, json, sys, time, urllib.request
def get(path):
    try:
        return urllib.request.urlopen("http://127.0.0.1:8123" + path, timeout=5).status
    except Exception:
        return 0
deadline = time.time() + 90
while get("/health") != 200 and time.time() < deadline:
    time.sleep(0.2)
def ask(img):
    data = base64.b64encode(open(img, "rb").read()).decode()
    body = {"model": "vl", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}, {"type": "text", "text": "What is this?"}]}]}
    req = urllib.request.Request("http://127.0.0.1:8123/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["message"]["content"]
want = {sys.argv[1]: json.load(open("/tmp/direct.image-40x56.png.json"))["text"], sys.argv[2]: json.load(open("/tmp/direct.imgB.png.json"))["text"]}
print("A and B answers differ (direct):", want[sys.argv[1]] != want[sys.argv[2]])
for name, img in (("A", sys.argv[1]), ("B", sys.argv[2]), ("A again", sys.argv[1]), ("B again", sys.argv[2])):
    got = ask(img)
    print(f"server {name}: equal to the direct run: {got == want[img]}")
PY
kill %1 2>/dev/null; wait 2>/dev/null
grep -iE "recording the vision|vision tower" /tmp/serve.err | head -5 | tee -a $OUT/server_ab.txt
echo "server done at $SECONDS s"
[ "${ONLY_CORRECTNESS:-0}" = 1 ] && exit 0
BUDGET=$(( ${BUDGET:-560} - SECONDS - 90 )) bash benches/gpu/run_vl_2b.sh
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
for round in 1 2; do
  for which in before bin; do
    for side in 448 1344 text; do
      img="--image /tmp/img$side.png"; [ $side = text ] && img=""
      timeout 40 .gpu/$which/inference-pio run --plugin-dir .gpu/$which --config /tmp/vl.toml --model /tmp/vl2b $img \
        --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 32 --json --repeat 4 \
        > /tmp/$which$side.$round.json 2> /tmp/$which$side.err || tail -2 /tmp/$which$side.err
    done
  done
done
python3 - <<'PY' | tee $OUT/ab.txt
import json
for which in ("before", "bin"):
    for side in ("448", "1344", "text"):
        for rnd in (1, 2):
            try:
                d = json.load(open(f"/tmp/{which}{side}.{rnd}.json"))
                print(which, side, rnd, [round(r["time_to_first_token_s"] * 1e3, 1) for r in d["runs"]], "ms; first4", d["token_ids"][:4])
            except Exception as e:
                print(which, side, rnd, "error", e)
PY
echo "all done at $SECONDS s"
