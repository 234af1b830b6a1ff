#!/usr/bin/env bash
# One device call: the worker sandbox on the GPU machine, whose cgroup is v2 with only the
# `memory` controller delegated (the CI machine has cgroup v1 hierarchies instead):
# 1. the hostile test plugin at `high` with memory_gb = 0.25: `plugins info`, an allocation
#    past the limit (the kernel's OOM killer, through cgroup v2 memory.max), one within it,
#    naming a thread (the CUDA driver's need) and writing another process's /proc file;
# 2. the tiny Qwen3-MoE on CUDA at `maximum` with gpu_memory_gb = 0.05 (the NVML watchdog).
# Carried: .gpu/{inference-pio,libpio_test_plugin_hostile.so,libqwen3_coder_30b.so}.xz.
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libpio_test_plugin_hostile.so libqwen3_coder_30b.so
export XDG_CACHE_HOME=/tmp/xdg
cat /proc/self/cgroup > $OUT/cgroup.txt; cat /sys/fs/cgroup/$(sed -n 's/^0:://p' /proc/self/cgroup)/cgroup.controllers >> $OUT/cgroup.txt 2>&1
mkdir -p /tmp/hm && echo '{"architectures": ["PioTestHostileForCausalLM"]}' > /tmp/hm/config.json
printf '[plugins.test-hostile]\nsecurity = "high"\nallow_degraded = true\ntimeout_s = 60\n[plugins.test-hostile.limits]\nmemory_gb = 0.25\n' > /tmp/hmem.toml
hostile() { timeout 90 $PIO --config /tmp/hmem.toml run $PD --model /tmp/hm --plugin test-hostile --raw --prompt "$1"; echo "[exit $?]"; }
{
  timeout 60 $PIO --config /tmp/hmem.toml $PD plugins info test-hostile
  for p in alloc:2000 alloc:64 name-thread write:/proc/1/oom_score_adj:1 echo; do echo "== $p"; hostile $p 2>&1 | grep -v "^warning"; done
} 2>&1 | tee $OUT/hostile_high.txt
Q=plugins/qwen3-coder-30b/tests/fixtures
rm -rf /tmp/tiny && cp -rL $Q/qwen3moe-tiny-a /tmp/tiny
SHA=$(sha256sum .gpu/bin/libqwen3_coder_30b.so | cut -d' ' -f1)
printf '[plugins.qwen3-coder-30b]\nsecurity = "maximum"\nallow_degraded = true\ntimeout_s = 120\nsha256 = "%s"\n[plugins.qwen3-coder-30b.limits]\ngpu_memory_gb = 0.05\n' $SHA > /tmp/gmax.toml
{
  timeout 60 $PIO --config /tmp/gmax.toml $PD plugins info qwen3-coder-30b | grep -v "^settings"
  timeout 120 $PIO --config /tmp/gmax.toml run $PD --model /tmp/tiny --prompt-ids 1,2,3,4 --device cuda --dtype f32 --greedy --max-new-tokens 64 --json; echo "[exit $?]"
} 2>&1 | grep -v "^warning" | tee $OUT/gpu_memory_maximum.txt
echo "used $SECONDS s"
