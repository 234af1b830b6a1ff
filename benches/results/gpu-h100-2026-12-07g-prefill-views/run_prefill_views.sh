#!/usr/bin/env bash
# One device call after the prefill's copy-free query/key/value views (`feb15b1`): the tiny
# Qwen3-VL fixtures on CUDA (one image f32 and bf16 against transformers' greedy tokens; the
# text-only prompt as a batch of 4 rows, f32), then Qwen3-VL-2B's real config (random bf16
# weights) time to first token of a 448x448 and a 1344x1344 image and of the text alone, the
# plugin before (.gpu/before) and after, alternating, 2 rounds.
# Carried: .gpu/{inference-pio,libqwen3_vl_2b.so,qwen3-tokenizer.json}.xz,
# .gpu/before/libqwen3_vl_2b.so.xz, .gpu/COMMIT; the tree holds plugins/qwen3-vl-2b/tests.
set -uo pipefail
source benches/gpu/lib.sh
T=plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer
mkdir -p $T && [ -f .gpu/qwen3-tokenizer.json.xz ] && xz -dc .gpu/qwen3-tokenizer.json.xz > $T/tokenizer.json
unpack_gpu_binaries inference-pio libqwen3_vl_2b.so
mkdir -p .gpu/before && xz -dc .gpu/before/libqwen3_vl_2b.so.xz > .gpu/before/libqwen3_vl_2b.so && cp .gpu/bin/inference-pio .gpu/before/
ensure_cublas
export XDG_CACHE_HOME=/tmp/xdg
F=plugins/qwen3-vl-2b/tests/fixtures
for m in vl-tiny-a vl-tiny-b; do
  for dt in f32 bf16; do
    timeout 60 $PIO run $PD --model $F/$m --image $F/image-40x56.png --prompt "What is this?" --greedy --ignore-eos \
      --max-new-tokens 16 --json --device cuda --dtype $dt > /tmp/tiny.$m.$dt.json 2> /tmp/tiny.err || tail -3 /tmp/tiny.err
  done
  ids=$(python3 -c "import json,sys; print(','.join(map(str, next(c for c in json.load(open(sys.argv[1]))['cases'] if c['case'] == 'text-only')['ids'])))" $F/$m.reference.json)
  timeout 60 $PIO run $PD --model $F/$m --prompt-ids "$ids" --greedy --max-new-tokens 16 --json --batch 4 --device cuda --dtype f32 \
    > /tmp/tiny.$m.batch.json 2> /tmp/tiny.err || tail -3 /tmp/tiny.err
  python3 - $F/$m.reference.json /tmp/tiny.$m <<'PY' | tee -a $OUT/tiny.txt
import json, sys
cases = {c["case"]: c for c in json.load(open(sys.argv[1]))["cases"]}
name = sys.argv[1].split("/")[-1][:-15]
for dt in ("f32", "bf16"):
    try:
        got = json.load(open(f"{sys.argv[2]}.{dt}.json")); ref = cases["one-image"]
        print(f'{name} one image {dt}: greedy {sum(a == b for a, b in zip(got["token_ids"], ref["greedy"]))}/16')
    except Exception as e:
        print(f"{name} one image {dt}: {e}")
try:
    rows = [r["token_ids"] for r in json.load(open(f"{sys.argv[2]}.batch.json"))["rows"]]
    print(f'{name} text-only batch of {len(rows)} f32: rows equal to transformers {sum(r == cases["text-only"]["greedy"][:len(r)] for r in rows)}/{len(rows)}')
except Exception as e:
    print(f"{name} batch: {e}")
PY
done
CK=/tmp/vl2b; qwen3_vl_2b_dir $CK
python3 -c "
import numpy as np
from PIL import Image
rng = np.random.RandomState(0)
for s in (448, 1344):
    y, x = np.mgrid[0:s, 0:s]
    img = np.stack([x * 255 // s, y * 255 // s, ((x + y) * 127 // s) % 256], -1) + rng.randint(0, 16, (s, s, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f'/tmp/img{s}.png')"
printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
for round in 1 2; do
  for which in before bin; do
    for side in 448 1344 text; do
      img="--image /tmp/img$side.png"; [ $side = text ] && img=""
      timeout 40 .gpu/$which/inference-pio run --plugin-dir .gpu/$which --config /tmp/vl.toml --model $CK --random-weights $img \
        --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 16 --json --repeat 4 \
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
