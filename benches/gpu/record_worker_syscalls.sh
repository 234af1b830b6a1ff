#!/usr/bin/env bash
# One device call: the system calls a worker makes on CUDA, for the seccomp allowlist of
# security level `maximum` (inference-pio-host/seccomp/allowlist.txt). The tiny Qwen3 fixture
# (f32: run, a prompts-file batch, score) and Qwen3-4B (real config, --random-weights, bf16:
# batch 1 with CUDA graphs, a 16-row batch) run at `high` under `strace -f`;
# inference-pio-host/seccomp/worker_syscalls.py keeps the calls of the worker processes.
# Also records what the jail depends on here: kernel, user namespaces, a fresh /proc inside
# them, landlock, NVIDIA device nodes.
# Carried: .gpu/{inference-pio,libqwen3_4b_instruct_2507.so}.xz, .gpu/strace/ (see
# benches/gpu/strace_carried.sh).
set -uo pipefail
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_4b_instruct_2507.so
export XDG_CACHE_HOME=/tmp/xdg
exec > >(tee -a $OUT/log.txt) 2>&1
ensure_cublas
{
  uname -a; id; cat /proc/sys/user/max_user_namespaces /proc/sys/kernel/unprivileged_userns_clone 2>&1
  unshare --user --map-root-user --pid --fork --mount --mount-proc sh -c 'id; ls /proc | head -3' 2>&1
  unshare --user --pid --fork --mount --ipc --uts --net sh -c 'echo userns-all-ok' 2>&1
  ls -la /dev/nvidia* /dev/nvidia-caps 2>&1; grep -i -E "ModifyDevice|DeviceFileUID|DeviceFileMode" /proc/driver/nvidia/params
  grep -E "landlock|lsm" /sys/kernel/security/lsm 2>&1; cat /sys/kernel/security/lsm 2>&1; echo
  mount | grep -E " /proc | /sys | /dev " ; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} > $OUT/machine.txt 2>&1
P=plugins/qwen3-4b-instruct-2507
ID=qwen3-4b-instruct-2507
rm -rf /tmp/tiny /tmp/q4b && cp -rL $P/tests/fixtures/qwen3-tiny-a /tmp/tiny
mkdir -p /tmp/q4b && cp $P/primary/config.json /tmp/q4b/ && cp -L $P/tests/fixtures/qwen3-tokenizer/* /tmp/q4b/
printf '[plugins.%s]\nsecurity = "high"\nallow_degraded = true\ntimeout_s = 300\n' $ID > /tmp/high.toml
printf '[1,2,3]\n[4,5,6,7,8]\n[9,10]\n' > /tmp/p3.jsonl
python3 -c "
import random; r=random.Random(0)
open('/tmp/p16.jsonl','w').write(''.join(str([r.randrange(100,151000) for _ in range(64)])+'\n' for _ in range(16)))"
run() { local name=$1; shift; timeout 200 benches/gpu/strace_carried.sh -f -qq -o $OUT/$name.trace "$@" > $OUT/$name.out 2>&1; echo "$name exit $? at $SECONDS s"; tail -n 2 $OUT/$name.out; }
run tiny_run $PIO --config /tmp/high.toml run $PD --model /tmp/tiny --prompt-ids 1,2,3,4 --device cuda --dtype f32 --greedy --max-new-tokens 16
run tiny_batch $PIO --config /tmp/high.toml run $PD --model /tmp/tiny --prompts-file /tmp/p3.jsonl --device cuda --dtype f32 --max-new-tokens 8 --json
run tiny_score $PIO --config /tmp/high.toml score $PD --model /tmp/tiny --prompt-ids 1,2,3,4,5 --device cuda --dtype f32 --json
run q4b_b1 $PIO --config /tmp/high.toml run $PD --model /tmp/q4b --random-weights --prompt-ids 1,2,3,4,5,6,7,8 --device cuda --dtype bf16 --max-new-tokens 48 --ignore-eos --greedy
run q4b_b16 $PIO --config /tmp/high.toml run $PD --model /tmp/q4b --random-weights --prompts-file /tmp/p16.jsonl --device cuda --dtype bf16 --max-new-tokens 24 --ignore-eos --json
python3 inference-pio-host/seccomp/worker_syscalls.py $OUT/*.trace > $OUT/cuda_worker_syscalls.txt
wc -l $OUT/cuda_worker_syscalls.txt; tr '\n' ' ' < $OUT/cuda_worker_syscalls.txt; echo
mkdir -p /tmp/traces && mv $OUT/*.trace /tmp/traces/ && tar -C /tmp/traces -cJf $OUT/traces.tar.xz . 
echo "used $SECONDS s"
