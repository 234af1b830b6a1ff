#!/usr/bin/env python3
"""Compares `inference-pio score --json` / `run --json` output on the GPU with the committed
transformers fixtures. Usage: parity_check.py FIXTURE_JSON SCORE_JSON KIND(f32|bf16) [RUN_JSON]"""
import json
import sys

import numpy as np

ref = json.load(open(sys.argv[1]))
kind = sys.argv[3]
worst = 0.0
for i, prompt in enumerate(ref["prompts"]):
    got = np.array(json.load(open(f"{sys.argv[2]}.{i}"))["logits"], dtype=np.float64)
    want = np.array(prompt["logits" if kind == "f32" else "logits_bf16"], dtype=np.float64)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    worst = max(worst, err)
    if len(sys.argv) > 4:
        run = json.load(open(f"{sys.argv[4]}.{i}"))
        same = run["token_ids"] == prompt["greedy"]
        print(f"prompt {i} ({len(prompt['ids'])} tokens): rel L2 {err:.2e}, greedy identical: {same}")
    else:
        print(f"prompt {i} ({len(prompt['ids'])} tokens): rel L2 {err:.2e}")
print(f"{kind}: worst rel L2 {worst:.2e}")
