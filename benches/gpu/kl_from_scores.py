"""KL divergence of one `score --json` run's next-token distributions from another's.

Usage: kl_from_scores.py REFERENCE.json CANDIDATE.json
Prints {"positions", "mean_kl", "max_kl", "top1_agreement"} (KL(reference || candidate) per
position, as llama.cpp's `llama-perplexity --kl-divergence` reports it), or {} when either file
is missing or empty.
"""
import json
import os
import sys

import numpy as np


def logits(path):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    d = json.load(open(path))
    rows = d.get("logits") or (d.get("rows") or [{}])[0].get("logits")
    return None if rows is None else np.asarray(rows, dtype=np.float64)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


ref, got = logits(sys.argv[1]), logits(sys.argv[2])
if ref is None or got is None:
    print("{}")
    sys.exit(0)
n = min(len(ref), len(got))
lr, lg = log_softmax(ref[:n]), log_softmax(got[:n])
kl = (np.exp(lr) * (lr - lg)).sum(axis=1)
top1 = float((ref[:n].argmax(axis=1) == got[:n].argmax(axis=1)).mean())
print(json.dumps({"positions": int(n), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "top1_agreement": top1}))
