#!/usr/bin/env bash
# Records the system calls of inference-pio workers on the CPU into recorded/cpu.txt: the
# tiny Qwen3 fixture (a prompt, a prompts-file batch, a sampled --batch) and the built-in
# SmolLM2 (GGUF, llama plugin) run at security level `high` (no seccomp filter) under
# `strace -f`; worker_syscalls.py keeps the worker processes' calls. Run from the repository
# root after `cargo build --workspace` and `./target/debug/inference-pio models fetch`.
# (The CUDA list, recorded/cuda.txt, comes from benches/gpu/record_worker_syscalls.sh.)
set -euo pipefail
ROOT=$(pwd)
B=$ROOT/target/debug/inference-pio
W=$(mktemp -d)
cd "$W"
printf '[plugins.qwen3-4b-instruct-2507]\nsecurity = "high"\n[plugins.llama]\nsecurity = "high"\n' > inference-pio.toml
cp -rL "$ROOT/plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-a" tiny
printf '[1,2,3]\n[4,5,6,7,8]\n' > p.jsonl
strace -f -qq -o cpu1.trace "$B" run --model tiny --prompt "hello there" --max-new-tokens 8 > /dev/null
strace -f -qq -o cpu2.trace "$B" run --model tiny --prompts-file p.jsonl --max-new-tokens 6 --json > /dev/null
strace -f -qq -o cpu3.trace "$B" run --prompt "Hi" --max-new-tokens 8 --seed 3 > /dev/null
strace -f -qq -o cpu4.trace "$B" run --model tiny --prompt "a b c" --batch 3 --temperature 0.8 --top-p 0.9 --seed 1 --max-new-tokens 5 > /dev/null
python3 "$ROOT/inference-pio-host/seccomp/worker_syscalls.py" cpu*.trace > "$ROOT/inference-pio-host/seccomp/recorded/cpu.txt"
rm -rf "$W"
