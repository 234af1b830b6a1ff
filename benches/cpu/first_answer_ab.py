#!/usr/bin/env python3
"""Time to the README main job's first answer byte, from process start, alternating builds: each
DIR holds an `inference-pio` and the plugin files beside it, with a `.fingerprint` directory so
that discovery treats it as a cargo target directory (as the README's `./target/debug` is), i.e.
the host binary changes too, not only the plugin (benches/cpu/first_answer.py swaps plugins only).

    python3 benches/cpu/first_answer_ab.py ROUNDS DIR_A DIR_B
"""
import subprocess
import sys
import time


def run(d):
    t0 = time.time()
    p = subprocess.Popen([f"{d}/inference-pio", "run", "--prompt", "What is the capital of France?"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first, out = None, b""
    while True:
        c = p.stdout.read(1)
        if not c: break
        if first is None and c.strip(): first = time.time() - t0
        out += c
    p.wait()
    assert out.decode().strip() == "The capital of France is Paris.", out
    return first

rounds, dirs = int(sys.argv[1]), sys.argv[2:]
res = {d: [] for d in dirs}
for _ in range(rounds):
    for d in dirs: res[d].append(round(run(d), 3))
for d, v in res.items(): print(d, v, "median", sorted(v)[len(v)//2])
