#!/usr/bin/env python3
"""Time to the README main job's first answer byte, from process start, alternating plugin
builds (each a directory holding a `libllama.so`, passed as `--plugin-dir`), and when the
weights were loaded (the `weights loaded` line of INFERENCE_PIO_LOG=1). Every run must answer
`The capital of France is Paris.` (benches/results/cpu-2026-12-06h-gguf-load.md).

    python3 benches/cpu/first_answer.py ROUNDS PLUGIN_DIR_A [PLUGIN_DIR_B ...]
"""
import os
import re
import subprocess
import sys
import time


def run(plugin_dir):
    t0 = time.time()
    p = subprocess.Popen(["./target/debug/inference-pio", "--plugin-dir", plugin_dir, "run", "--prompt", "What is the capital of France?"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "INFERENCE_PIO_LOG": "1"})
    first, out = None, b""
    while True:
        c = p.stdout.read(1)
        if not c:
            break
        if first is None and c.strip():
            first = time.time() - t0
        out += c
    err = p.stderr.read().decode()
    p.wait()
    m = re.search(r"\[inference-pio\s+([0-9.]+) s\] weights loaded", err)
    return first, float(m.group(1)) if m else None, out.decode().strip()


def main():
    rounds, dirs = int(sys.argv[1]), sys.argv[2:]
    res = {d: [] for d in dirs}
    for _ in range(rounds):
        for d in dirs:
            first, weights, text = run(d)
            if text != "The capital of France is Paris.":
                sys.exit(f"{d}: answered {text!r}")
            res[d].append((round(first, 3), weights))
    for d, v in res.items():
        firsts, loads = sorted(x[0] for x in v), sorted(x[1] for x in v)
        print(d, "first answer byte (s):", [x[0] for x in v], "median", firsts[len(firsts) // 2],
              "| weights loaded at (s):", [x[1] for x in v], "median", loads[len(loads) // 2])


if __name__ == "__main__":
    main()
