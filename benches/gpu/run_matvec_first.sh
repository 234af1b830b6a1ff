#!/usr/bin/env bash
# One device call after the matrix-vector kernel (kernels/src/matvec.rs): the kernel against
# its reference and timed (kernel_check), the worker-sandbox CUDA diagnosis
# (diagnose_worker_cuda.py), then Qwen3-Coder-30B-A3B end to end (tiny f32 parity on CUDA,
# graphs and eager, transformers eager). Carried: .gpu/{inference-pio,libqwen3_coder_30b.so,
# kernel_check}.xz. Results packed into $OUT/results.tar.xz.
set -uo pipefail
ROOT_OUT=$OUT
source benches/gpu/lib.sh
unpack_gpu_binaries inference-pio libqwen3_coder_30b.so kernel_check
chmod +x .gpu/bin/kernel_check
mkdir -p $ROOT_OUT/kernels $ROOT_OUT/sandbox $ROOT_OUT/30b
export XDG_CACHE_HOME=/tmp/xdg
timeout 150 .gpu/bin/kernel_check 2>&1 | tee $ROOT_OUT/kernels/kernel_check.txt | grep -v "^\[" ; echo "kernel_check exit ${PIPESTATUS[0]} at $SECONDS s"
[ -x .gpu/strace/strace ] && export PATH=$PWD/.gpu/strace:$PATH LD_LIBRARY_PATH=$PWD/.gpu/strace STRACE_TRACE=all
timeout 120 python3 benches/gpu/diagnose_worker_cuda.py $ROOT_OUT/sandbox/diagnose.json 2>&1 | tee $ROOT_OUT/sandbox/diagnose.txt | tail -40; echo "diagnose at $SECONDS s"; unset LD_LIBRARY_PATH
OUT=$ROOT_OUT/30b WARM=0 BUDGET=$(( 560 - SECONDS )) NEW_TOKENS=48 TINY_DTYPES=f32 TINY_MODELS=qwen3moe-tiny-a PEERS=eager bash benches/gpu/run_decode_graphs.sh 30b 2>&1 | tee $ROOT_OUT/30b/log.txt | grep -v '^  \|^ "' | tail -30
tar cJf $ROOT_OUT/results.tar.xz -C $ROOT_OUT kernels sandbox 30b && rm -rf $ROOT_OUT/kernels $ROOT_OUT/sandbox $ROOT_OUT/30b
echo "used $SECONDS s"
