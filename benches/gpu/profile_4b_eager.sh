set -u
mkdir -p .gpu/bin
for f in decode_ops inference-pio libqwen3_4b_instruct_2507.so; do xz -dc .gpu/$f.xz > .gpu/bin/$f; done
chmod +x .gpu/bin/decode_ops .gpu/bin/inference-pio
timeout 100 .gpu/bin/decode_ops > $OUT/decode_ops.txt 2>&1; echo "decode_ops exit $?"
grep -v "^ \|^Caused\|^Backtrace\|^No backtrace\|^Asked" $OUT/decode_ops.txt | head -30
CK=/tmp/m4b; mkdir -p $CK; P=plugins/qwen3-4b-instruct-2507
cp $P/primary/config.json $CK/; cp -L $P/tests/fixtures/qwen3-tokenizer/tokenizer.json $P/tests/fixtures/qwen3-tokenizer/tokenizer_config.json $CK/
printf '[plugins.qwen3-4b-instruct-2507]\ncuda_graphs = false\n' > /tmp/eager.toml
printf '[profiling.logger]\nlevel = "basic"\nfile = "%s/profile.log"\n' "$OUT" > cubecl.toml
XDG_CACHE_HOME=/tmp/xdg timeout 150 .gpu/bin/inference-pio --config /tmp/eager.toml run --plugin-dir .gpu/bin --model $CK --random-weights --prompt-ids 1000,1001,1002,1003,1004,1005,1006,1007 --device cuda --dtype bf16 --greedy --max-new-tokens 6 > $OUT/run.txt 2> $OUT/run_stderr.txt; echo "run exit $?"
tail -3 $OUT/run_stderr.txt; ls -la $OUT; wc -l $OUT/profile.log; head -c 3000 $OUT/profile.log; echo; tail -c 6000 $OUT/profile.log
xz -9 $OUT/profile.log
