#!/usr/bin/env bash
# Quantized weights on the GPU (issue 21), one device call: the quantized-product kernels
# against their dequantized references (`kernel_check quant`), then Qwen3-4B (real config,
# random weights) with its linear weights in bf16, int8 (per channel) and int4 (groups of 128)
# through pio-bench — batch-1 and batch-32 decode, a 2,048-token prefill, peak GPU memory —
# the divergence of int8 and int4 from bf16 on one teacher-forced prompt (`score --json`),
# and llama.cpp on a saved random bf16 checkpoint of the same config converted to GGUF BF16,
# Q8_0 and Q4_K_M (`llama-bench -fa 1`: pp2048 and tg128; `llama-batched-bench`: 32
# sequences).
# The llama.cpp build (background, cores 6 and up) and the checkpoint are made by the first
# call on a machine and kept in /tmp: STAGES="prepare" in a first call, then the measuring call
# while the machine is still held.
# Carried: .gpu/{inference-pio,pio-bench,libqwen3_4b_instruct_2507.so,kernel_check}.xz,
# .gpu/COMMIT, .gpu/peers/.
# Writes $OUT/{log.txt,device.txt,kernel_check.txt,pio_*.json,score_kl.json,results.json}.
# Env: BUDGET (s, default 570), STAGES (default "prepare kernels ours peers"; "convert": the
# GGUF conversions without measuring llama.cpp; "gguf": our engine on the converted Q4_K_M
# file, its blocks kept and dequantized, after a call that converted it), MODES (default
# "bf16 int8 int4"; also "fp8": E4M3 in 128x128 blocks; "int4exact": int4 weights with
# `quant_activations = "exact"`, i.e. dequantized and multiplied by cuBLAS), CASES (default "b1 b32 p2048"; "none": only the KL),
# SCORE (default 1; 0: no divergence runs, the score_kl.json of an earlier call on the machine stands).
set -uo pipefail
BUDGET=${BUDGET:-570}
STAGES=${STAGES:-prepare kernels ours peers}
source benches/gpu/lib.sh
for f in inference-pio pio-bench libqwen3_4b_instruct_2507.so; do [ -f .gpu/$f.xz ] && unpack_gpu_binaries $f; done
export XDG_CACHE_HOME=/tmp/xdg
export INFERENCE_PIO_PLUGIN_DIR=$PWD/.gpu/bin
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( BUDGET - SECONDS )); }
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
SAVED=/tmp/q4b
B=/tmp/llama.cpp/build/bin

# The saved checkpoint llama.cpp converts (our runs draw the same config's weights on the device).
has prepare && prepare_peers $P/primary/config.json $P/tests/fixtures/qwen3-tokenizer $SAVED

if has kernels && [ -f .gpu/kernel_check.xz ]; then
  unpack_gpu_binaries kernel_check
  timeout 240 taskset -c 0-5 .gpu/bin/kernel_check ${KC_GROUPS:-quant} > $OUT/kernel_check.txt 2>&1; echo "kernel_check exit $? at $SECONDS s"
  grep -E "FAIL|checks|failed to run|panicked| (1|32|512) rows BF16" $OUT/kernel_check.txt | head -60
fi

CK=$(qwen3_4b_dir)
for mode in ${MODES:-bf16 int8 int4} int4exact gguf gguf_none; do
  if [ $mode = gguf_none ]; then printf '[plugins.%s]\nquantization = "none"\n' $ID
  elif [ $mode = int4exact ]; then printf '[plugins.%s]\nquantization = "int4"\nquant_activations = "exact"\n' $ID
  elif [ $mode = bf16 ] || [ $mode = gguf ]; then printf '[plugins.%s]\n' $ID; else printf '[plugins.%s]\nquantization = "%s"\n' $ID $mode; fi > /tmp/q_$mode.toml
done
MODEL_ARGS="--model $CK --random-weights"
bench() { # mode case prompt_tokens new_tokens batch runs (the model: $MODEL_ARGS)
  local t=$(( $(left) - 30 )); [ $t -lt 30 ] && { echo "no time for $1 $2"; return; }
  local start=$SECONDS
  timeout $t taskset -c 0-5 .gpu/bin/pio-bench --host $PIO --config /tmp/q_$1.toml $MODEL_ARGS --prompt-tokens $3 --new-tokens $4 \
    --batch $5 --runs $6 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
    --commit "$(cat .gpu/COMMIT 2>/dev/null || echo unknown)" --out $OUT/pio_$1_$2.json 2> $OUT/pio_$1_$2_stderr.txt
  echo "pio-bench $1 $2: exit $? after $(( SECONDS - start )) s"
  python3 - $OUT/pio_$1_$2.json <<'PY' 2>/dev/null || tail -3 $OUT/pio_$1_$2_stderr.txt
import json, sys
d = json.load(open(sys.argv[1]))
keys = ["batch", "prompt_tokens", "median_prefill_tokens_per_s", "median_steady_decode_tokens_per_s", "peak_gpu_mib"]
print(json.dumps({k: d.get(k) for k in keys}))
PY
}
# measure MODE: each of CASES through pio-bench, then `score` over the KL prompt into
# /tmp/score_MODE.json (the model: $MODEL_ARGS).
measure() {
  local mode=$1 c t
  [ -f /tmp/kl_ids.txt ] || python3 -c "import random; r=random.Random(7); print(','.join(str(r.randrange(100, 151000)) for _ in range(96)))" > /tmp/kl_ids.txt
  for c in ${CASES:-b1 b32 p2048}; do
    case $c in
      b1) bench $mode b1 128 256 1 2 ;;
      b8) bench $mode b8 128 128 8 2 ;;
      b32) bench $mode b32 128 128 32 2 ;;
      p2048) bench $mode p2048 2048 1 1 3 ;;
    esac
  done
  t=$(( $(left) - 30 ))
  # The divergence is measured on the saved checkpoint when there is one (every mode reads
  # the same weights from it), else on the random draw.
  local kl_args=$MODEL_ARGS
  [[ "$MODEL_ARGS" == *--random-weights* ]] && { [ -f $SAVED/model.safetensors.index.json ] || [ -f $SAVED/model.safetensors ]; } && kl_args="--model $SAVED"
  [ "${SCORE:-1}" = 1 ] && [ $t -gt 30 ] && timeout $t taskset -c 0-5 $PIO score $PD --config /tmp/q_$mode.toml $kl_args --device cuda --dtype bf16 \
    --prompt-ids "$(cat /tmp/kl_ids.txt)" --json > /tmp/score_$mode.json 2> /tmp/score_$mode.err || tail -2 /tmp/score_$mode.err
  [ "${SCORE:-1}" = 1 ] && grep -a -m2 "quantiz" /tmp/score_$mode.err
}
if has ours; then
  for mode in ${MODES:-bf16 int8 int4}; do measure $mode; done
  # KL of each quantized mode from bf16 (numpy; a pure-Python loop over the logits outran a call).
  { echo "{"; sep=""; for mode in int8 int4 int4exact fp8; do
      [ -s /tmp/score_$mode.json ] && { printf '%s"%s": %s\n' "$sep" $mode "$(timeout 120 python3 benches/gpu/kl_from_scores.py /tmp/score_bf16.json /tmp/score_$mode.json)"; sep=","; }
    done; echo "}"; } | tee $OUT/score_kl.json
  echo "ours done at $SECONDS s"
fi

if has convert || has peers; then
  while [ ! -f /tmp/llama.cpp.done ] && [ $(left) -gt 200 ]; do sleep 5; done
  while [ ! -f /tmp/ckpt.done ] && [ ! -f $SAVED/model.safetensors.index.json ] && [ $(left) -gt 200 ]; do sleep 5; done
  if [ "$(cat /tmp/llama.cpp.done 2>/dev/null)" = 0 ]; then
    [ -f /tmp/q4b.gguf ] || PYTHONPATH=/tmp/llama.cpp/gguf-py timeout $(( $(left) - 60 )) python3 /tmp/llama.cpp/convert_hf_to_gguf.py $SAVED --outtype bf16 --outfile /tmp/q4b.gguf 2>&1 | tail -1
    for q in Q8_0 Q4_K_M; do
      [ -f /tmp/q4b.$q.gguf ] || { [ -f /tmp/q4b.gguf ] && timeout $(( $(left) - 60 )) $B/llama-quantize /tmp/q4b.gguf /tmp/q4b.$q.gguf $q > /tmp/quantize_$q.txt 2>&1; tail -1 /tmp/quantize_$q.txt; }
    done
    if has peers; then
      ms=""; for f in /tmp/q4b.gguf /tmp/q4b.Q8_0.gguf /tmp/q4b.Q4_K_M.gguf; do [ -f $f ] && ms="$ms -m $f"; done
      [ -n "$ms" ] && timeout $(( $(left) - 20 )) $B/llama-bench $ms -ngl 99 -fa 1 -p 2048 -n 128 -r 3 > /tmp/llama_bench.txt 2>&1; cat /tmp/llama_bench.txt | grep '^|'
      for f in /tmp/q4b.gguf /tmp/q4b.Q8_0.gguf /tmp/q4b.Q4_K_M.gguf; do
        [ -f $f ] && [ $(left) -gt 40 ] && timeout $(( $(left) - 20 )) $B/llama-batched-bench -m $f -ngl 99 -fa on -c 16384 -npp 128 -ntg 128 -npl 32 > /tmp/llama_batched_$(basename $f .gguf).txt 2>&1
        grep '^|' /tmp/llama_batched_$(basename $f .gguf).txt | tail -1
      done
    fi
  else
    echo "llama.cpp build not done (status $(cat /tmp/llama.cpp.done 2>/dev/null || echo running)) at $SECONDS s"
  fi
fi

# Our engine on llama.cpp's own Q4_K_M file: its blocks kept (unset) and dequantized to bf16
# ("none"), and the divergence of the kept from the dequantized on the same prompt.
if has gguf && [ -f /tmp/q4b.Q4_K_M.gguf ]; then
  MODEL_ARGS="--model /tmp/q4b.Q4_K_M.gguf"
  for mode in gguf gguf_none; do measure $mode; done
  echo "{\"gguf_kept_vs_dequantized\": $(timeout 120 python3 benches/gpu/kl_from_scores.py /tmp/score_gguf_none.json /tmp/score_gguf.json)}" | tee $OUT/score_kl_gguf.json
  echo "gguf done at $SECONDS s"
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
for name, key in (("score_kl.json", "divergence_from_bf16"), ("score_kl_gguf.json", "divergence_gguf")):
    if os.path.exists(o + "/" + name):
        try:
            out[key] = json.load(open(o + "/" + name))
        except Exception:
            pass
for f in sorted(glob.glob("/tmp/llama_b*.txt")):
    out["peer_" + os.path.basename(f)[:-4]] = [l for l in open(f).read().splitlines() if l.startswith("|")]
json.dump(out, open(o + "/results.json", "w"), indent=1)
PY
echo "done at $SECONDS s"
# A call returns at most 8 files: the per-run files travel as one archive.
(cd $OUT && ls pio_*.json >/dev/null 2>&1 && tar czf runs.tgz pio_*.json pio_*_stderr.txt 2>/dev/null && rm -f pio_*.json pio_*_stderr.txt)
