#!/usr/bin/env bash
# Issue 20, prefill: the reference prompt attention's causal pieces. A long prefill chunk's rows
# run in pieces of at most INFERENCE_PIO_CAUSAL_PIECE_ROWS (default 512; 0: the old way, pieces
# only by the scores cap, each over its whole context), each piece over only the keys its rows
# see (kernels/src/paged.rs, `reference_pieces`, `piece_keys`).
# 1. `kernel_check flash` (cubek's flash attention beside the reference's products), then
#    `kernel_check prefill` with KC_ROWS's settings (default "0 default": the prefill cases'
#    reference timings, and the prefill kernel checked against the reference).
# 2. Qwen3-4B's real config, random bf16 weights, prefix caching off, `pio-bench` (3 runs a
#    process: the median is a warm one): prefill of TOKENS_LIST prompts (1 new token) at each of
#    ROWS_LIST (default "0 default 256 flash"; `flash`: the default cut with
#    INFERENCE_PIO_PREFILL_FLASH=1, cubek's flash attention for prompt chunks), ROUNDS rounds
#    alternating; no run starts after BUDGET seconds. Before them, 8 greedy tokens of a
#    2,048-token prompt with each setting (ids compared: the same prompt must give the same
#    tokens, up to random weights' near-ties).
# 3. With KEYS30 set (e.g. "default 64"): the 30B decode check of run_30b_split_keys.sh after it.
# Carried: .gpu/{inference-pio,pio-bench,kernel_check,libqwen3_4b_instruct_2507.so,qwen3-tokenizer.json}.xz,
# .gpu/COMMIT (and libqwen3_coder_30b.so.xz for KEYS30).
set -uo pipefail
source benches/gpu/lib.sh
device_setup inference-pio pio-bench kernel_check libqwen3_4b_instruct_2507.so
ROWS_LIST=${ROWS_LIST:-"0 default 256 flash"}
with_rows() { # ROWS COMMAND...: COMMAND with INFERENCE_PIO_CAUSAL_PIECE_ROWS=ROWS (`default`: unset; `flash`: unset and INFERENCE_PIO_PREFILL_FLASH=1)
  local rows=$1; shift
  case $rows in
    default) env "$@" ;;
    flash) env INFERENCE_PIO_PREFILL_FLASH=1 "$@" ;;
    *) env INFERENCE_PIO_CAUSAL_PIECE_ROWS=$rows "$@" ;;
  esac
}
timeout ${FLASH_S:-150} .gpu/bin/kernel_check flash > $OUT/kernel_check_flash.txt 2>&1
echo "kernel_check flash: exit $? at $SECONDS s"; grep -v "^\[" $OUT/kernel_check_flash.txt | tail -8
for rows in ${KC_ROWS:-0 default}; do
  with_rows $rows timeout 150 .gpu/bin/kernel_check prefill > $OUT/kernel_check_rows$rows.txt 2>&1
  echo "kernel_check prefill, rows $rows: exit $? at $SECONDS s, $(grep -c FAIL $OUT/kernel_check_rows$rows.txt) FAIL lines"
  grep -E "prefill" $OUT/kernel_check_rows$rows.txt | sed "s/^/  rows $rows: /" | head -20
done
CK=$(qwen3_4b_dir)
printf '[plugins.qwen3-4b-instruct-2507]\nprefix_caching = false\nmax_context_tokens = 16384\n' > /tmp/nocache.toml
IDS=$(python3 -c "print(','.join(str(1000 + (i * 7919) % 20000) for i in range(2048)))")
for rows in $ROWS_LIST; do
  with_rows $rows timeout 120 $PIO --config /tmp/nocache.toml run --model $CK --random-weights --prompt-ids "$IDS" --greedy --ignore-eos \
    --max-new-tokens 8 --json --device cuda --dtype bf16 > $OUT/greedy-rows$rows.json 2> /tmp/g.err || tail -3 /tmp/g.err
  python3 -c "import json, sys; print('greedy, rows', sys.argv[1], json.load(open(sys.argv[2]))['token_ids'])" $rows $OUT/greedy-rows$rows.json 2>&1 | tail -1 | tee -a $OUT/greedy.txt
done
for round in $(seq ${ROUNDS:-2}); do
  for tokens in ${TOKENS_LIST:-2048 8192}; do
    for rows in $ROWS_LIST; do
      [ $SECONDS -lt ${BUDGET:-100000} ] || { echo "budget: $tokens tokens, rows $rows not run"; continue; }
      rm -f /tmp/pp.json
      with_rows $rows timeout 200 .gpu/bin/pio-bench --host $PIO --config /tmp/nocache.toml --model $CK --random-weights --prompt-tokens $tokens \
        --new-tokens 1 --batch 1 --runs 3 --processes 1 --device cuda --dtype bf16 --machine "$(cat $OUT/device.txt)" \
        --commit "$(cat .gpu/COMMIT)" --out /tmp/pp.json 2> /tmp/pp.err || tail -3 /tmp/pp.err
      cp /tmp/pp.json $OUT/prefill$tokens-rows$rows-round$round.json 2>/dev/null
      python3 -c "import json, sys; d = json.load(open('/tmp/pp.json')); print(f'4B prefill {sys.argv[1]} tokens, causal piece rows {sys.argv[2]}: ', round(d['median_prefill_tokens_per_s']), 'tok/s, peak', round(d.get('peak_gpu_mib') or 0), 'MiB, at', sys.argv[3], 's')" \
        "$tokens" "$rows" "$SECONDS" 2>&1 | tail -1 | tee -a $OUT/prefill.txt
    done
  done
done
if [ -n "${KEYS30:-}" ]; then
  unpack_gpu_binaries libqwen3_coder_30b.so
  f=plugins/qwen3-coder-30b/tests/fixtures/qwen3-coder-tokenizer
  mkdir -p $f && cp plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer/tokenizer.json plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tokenizer/tokenizer_config.json $f/
  KEYS="$KEYS30" BUDGET=${BUDGET30:-100000} bash benches/gpu/run_30b_split_keys.sh 2>&1 | grep -v "^cuBLAS" | tail -8
fi
echo "script used $SECONDS s"
