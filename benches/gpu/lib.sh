# Shared by the device scripts (source it from the repository root).
# PIO: the unpacked host binary; PD: its plugin directory argument.
PIO=.gpu/bin/inference-pio
PD="--plugin-dir .gpu/bin"

# unpack_gpu_binaries NAME...: .gpu/NAME.xz (carried, xz-compressed) -> .gpu/bin/NAME, executable.
unpack_gpu_binaries() {
  mkdir -p .gpu/bin
  for f in "$@"; do xz -dc ".gpu/$f.xz" > ".gpu/bin/$f" && chmod +x ".gpu/bin/$f"; done
}

# ensure_cublas: cuBLAS (opened at run time by inference-pio-kernels under the names
# libcublas.so and libcublas.so.13) on the loader's path: the system's if it has one, else the
# first libcublas.so.13 under the CUDA installations or Python's packages (PyTorch's wheel).
ensure_cublas() {
  if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13 '; then
    local lib
    lib=$(find /usr/local/cuda*/ /opt/cuda* $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) \
      -name 'libcublas.so.13*' 2>/dev/null | head -1)
    [ -n "$lib" ] && export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  echo "cuBLAS: $(ldconfig -p 2>/dev/null | grep -m1 'libcublas\.so\.13 ' | sed 's/.*=> //')${LD_LIBRARY_PATH:+ LD_LIBRARY_PATH=$LD_LIBRARY_PATH}"
}

# restore_qwen3_tokenizer: Qwen3's 11 MB tokenizer.json, left out of the tree a call carries,
# back in its fixture folder from .gpu/qwen3-tokenizer.json.xz (when carried).
restore_qwen3_tokenizer() {
  local t=plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer
  mkdir -p $t && [ -f .gpu/qwen3-tokenizer.json.xz ] && xz -dc .gpu/qwen3-tokenizer.json.xz > $t/tokenizer.json
}

# device_setup NAME...: a call's usual start: Qwen3's tokenizer restored, the carried binaries
# NAME... unpacked, cuBLAS found, the kernel cache and the plugin directory set, and the card
# named on stdout and in $OUT/device.txt.
device_setup() {
  restore_qwen3_tokenizer
  unpack_gpu_binaries "$@"
  ensure_cublas > /dev/null
  export XDG_CACHE_HOME=/tmp/xdg INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
}

# vl_tiny_one_image MODEL DTYPE: the tiny Qwen3-VL fixture MODEL's one-image prompt through `run`
# on CUDA in DTYPE, its prompt ids and 16 greedy tokens against transformers' (a line on stdout).
vl_tiny_one_image() {
  local f=plugins/qwen3-vl-2b/tests/fixtures m=$1 dt=$2
  timeout 120 $PIO run $PD --model $f/$m --image $f/image-40x56.png --prompt "What is this?" --greedy --ignore-eos \
    --max-new-tokens 16 --json --device cuda --dtype $dt > /tmp/tiny.$m.$dt.json 2> /tmp/tiny.err || tail -3 /tmp/tiny.err
  python3 - $f/$m.reference.json /tmp/tiny.$m.$dt.json $dt <<'PY'
import json, sys
ref = next(c for c in json.load(open(sys.argv[1]))["cases"] if c["case"] == "one-image")
got = json.load(open(sys.argv[2]))
print(f'{sys.argv[1].split("/")[-1][:-15]} {sys.argv[3]}: prompt ids equal {got["prompt_token_ids"] == ref["ids"]}, '
      f'greedy identical {got["token_ids"] == ref["greedy"]} ({sum(a == b for a, b in zip(got["token_ids"], ref["greedy"]))}/16)')
PY
}

# gpu_parity FIXTURE_DIR MODEL DTYPE...: each prompt of MODEL's committed transformers
# reference through `score` and `run` on CUDA, compared by parity_check.py (logits at every
# position, greedy tokens); the lines go to stdout and $OUT/parity.txt.
gpu_parity() {
  local fix=$1 m=$2 dt ids i
  shift 2
  python3 - "$fix/$m.reference.json" > /tmp/prompts.txt <<'PY'
import json,sys
for p in json.load(open(sys.argv[1]))["prompts"]: print(",".join(map(str,p["ids"])))
PY
  for dt in "$@"; do
    i=0
    while read -r ids; do
      timeout 120 $PIO score $PD --model "$fix/$m" --prompt-ids "$ids" --json --device cuda --dtype $dt > /tmp/score.$m.$dt.json.$i 2>/tmp/err.txt || cat /tmp/err.txt
      timeout 120 $PIO run $PD --model "$fix/$m" --prompt-ids "$ids" --json --device cuda --dtype $dt --greedy --max-new-tokens 16 > /tmp/run.$m.$dt.json.$i 2>/tmp/err.txt || cat /tmp/err.txt
      i=$((i+1))
    done < /tmp/prompts.txt
    echo "== $m $dt" | tee -a $OUT/parity.txt
    python3 benches/gpu/parity_check.py "$fix/$m.reference.json" /tmp/score.$m.$dt.json $dt /tmp/run.$m.$dt.json 2>&1 | tee -a $OUT/parity.txt
  done
}

# qwen3_4b_dir: a model directory with Qwen3-4B-Instruct-2507's real config.json and
# tokenizer and no weights (runs use --random-weights); prints its path.
qwen3_4b_dir() {
  local p=plugins/qwen3-4b-instruct-2507 ck=/tmp/m4b
  mkdir -p $ck
  cp $p/primary/config.json $ck/
  cp -L $p/tests/fixtures/qwen3-tokenizer/tokenizer.json $p/tests/fixtures/qwen3-tokenizer/tokenizer_config.json $ck/
  echo $ck
}

# random_prompts ROWS TOKENS: ROWS lines of TOKENS random Qwen3 token ids each (JSON arrays,
# `run --prompts-file`), seeded by ROWS, on stdout.
random_prompts() {
  python3 - "$1" "$2" <<'PY'
import json, random, sys
r = random.Random(int(sys.argv[1]))
for _ in range(int(sys.argv[1])):
    print(json.dumps([r.randrange(100, 151000) for _ in range(int(sys.argv[2]))]))
PY
}

# qwen3_coder_30b_dir: a model directory with the real Qwen3-Coder-30B-A3B config.json and
# tokenizer and no weights (runs use --random-weights); prints its path.
qwen3_coder_30b_dir() {
  local fix=plugins/qwen3-coder-30b/tests/fixtures ck=/tmp/qwen3-coder-30b
  mkdir -p $ck
  cp plugins/qwen3-coder-30b/primary/config.json $ck/
  cp -L $fix/qwen3-coder-tokenizer/tokenizer.json $fix/qwen3-coder-tokenizer/tokenizer_config.json $ck/
  echo $ck
}

# qwen3_vl_2b_dir DIR: DIR as a Qwen3-VL-2B-Instruct directory without weights (runs use
# --random-weights, or a checkpoint saved into it): the real config, preprocessor config and
# chat template, with Qwen3's tokenizer (the same 151,936 tokens, vision tokens included).
# Qwen3's tokenizer_config.json carries the text-only chat template; it is dropped so that
# binaries from before the processor-template precedence (b8232ee and older) use the VL one.
qwen3_vl_2b_dir() {
  local ck=$1
  mkdir -p $ck
  cp plugins/qwen3-vl-2b/primary/{config.json,preprocessor_config.json,chat_template.json} $ck/
  cp -L plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer/{tokenizer.json,tokenizer_config.json} $ck/
  python3 -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c.pop('chat_template', None); json.dump(c, open(p, 'w'))" $ck/tokenizer_config.json
}

# prepare_peers CONFIG TOKENIZER_DIR SAVED [cpu]: in the background, on cores 6 and up,
# llama.cpp's build (unless already started; .gpu/peers/ carried) and a random bf16 checkpoint of
# CONFIG saved in SAVED (unless there; /tmp/ckpt.done then holds its exit status). With "cpu" the
# checkpoint is drawn on the CPU, so that it does not share the GPU with what runs meanwhile.
prepare_peers() {
  local cores=$(nproc)
  if [ ! -f /tmp/llama.cpp.started ] && [ -f .gpu/peers/build_llamacpp.sh ]; then
    taskset -c 6-$(( cores - 1 )) bash .gpu/peers/build_llamacpp.sh /tmp/llama.cpp
  fi
  if [ ! -f $3/model.safetensors.index.json ] && [ ! -f $3/model.safetensors ]; then
    ( [ "${4:-}" = cpu ] && export CUDA_VISIBLE_DEVICES=
      taskset -c 6-$(( cores - 1 )) python3 benches/gpu/make_random_checkpoint.py $1 $2 $3 > /tmp/ckpt.log 2>&1; echo $? > /tmp/ckpt.done ) &
  fi
}

# bench_4b_decode ROWS LABEL [CONFIG]: Qwen3-4B (real config, random bf16 weights) through
# pio-bench with the caller's environment (its switches) and CONFIG (a config file, e.g. a
# `quantization`; default none), a 128-token prompt and 256 new tokens at ROWS rows, two runs:
# "4B batch ROWS, LABEL: steady decode X tok/s" (their median) on stdout and in $OUT/decode.txt;
# the run's JSON stays in /tmp/pio.json. Needs .gpu/bin/pio-bench and $OUT/device.txt.
bench_4b_decode() {
  local ck config=${3:-/tmp/empty.toml}
  ck=$(qwen3_4b_dir)
  [ -n "${3:-}" ] || : > /tmp/empty.toml
  rm -f /tmp/pio.json
  timeout 90 .gpu/bin/pio-bench --host $PIO --config $config --model $ck --random-weights --prompt-tokens 128 --new-tokens 256 \
    --batch $1 --runs 2 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT)" --out /tmp/pio.json 2> /tmp/pio.err || tail -3 /tmp/pio.err
  python3 -c "import json, sys; d = json.load(open('/tmp/pio.json')); print(f'4B batch {sys.argv[1]}, {sys.argv[2]}: steady decode', round(d['median_steady_decode_tokens_per_s'], 1), 'tok/s')" \
    "$1" "$2" 2>&1 | tail -1 | tee -a $OUT/decode.txt
}

# vl_2b_decode_after_image LABEL: Qwen3-VL-2B (real config, random bf16 weights, an 8 GB KV
# cache, no prefix caching) on a 448x448 test image, "Describe this image.", 256 greedy tokens,
# twice, with the caller's environment: "2B after a 448 image, LABEL: decode X steady Y tok/s;
# first8 [...]" on stdout and in $OUT/decode.txt. Makes the model directory and image once.
vl_2b_decode_after_image() {
  if [ ! -f /tmp/img448.png ] || [ ! -f /tmp/vl.toml ] || [ ! -f /tmp/vl2b/config.json ]; then
    qwen3_vl_2b_dir /tmp/vl2b
    python3 -c "
import numpy as np
from PIL import Image
rng = np.random.RandomState(0); side = 448
y, x = np.mgrid[0:side, 0:side]
img = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) * 127 // side) % 256], -1) + rng.randint(0, 16, (side, side, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save('/tmp/img448.png')"
    printf '[plugins.qwen3-vl-2b]\nkv_cache_gb = 8\nprefix_caching = false\n' > /tmp/vl.toml
  fi
  rm -f /tmp/vl.json
  timeout 60 $PIO run $PD --config /tmp/vl.toml --model /tmp/vl2b --random-weights --image /tmp/img448.png \
    --prompt "Describe this image." --device cuda --dtype bf16 --greedy --ignore-eos --max-new-tokens 256 --json --repeat 2 > /tmp/vl.json 2> /tmp/vl.err || tail -2 /tmp/vl.err
  python3 -c "
import json, sys; d = json.load(open('/tmp/vl.json')); t = d['timings']
print(f'2B after a 448 image, {sys.argv[1]}: decode', round(t['decode_tokens_per_s'], 1), 'steady', round(t.get('steady_decode_tokens_per_s') or 0, 1), 'tok/s; first8', d['token_ids'][:8])" \
    "$1" 2>&1 | tail -1 | tee -a $OUT/decode.txt
}
