#!/usr/bin/env python3
"""A random-weight bf16 checkpoint of a real config, saved as an HF model directory, so every
peer in a benchmark call (ours, transformers, llama.cpp through its GGUF converter) loads the
same weights. Weights ~ N(0, 0.02) as transformers initialises them, built on the GPU.

    python3 make_random_checkpoint.py CONFIG.json TOKENIZER_DIR OUT_DIR
"""
import os
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

config_path, tok_dir, out = sys.argv[1:4]
os.makedirs(out, exist_ok=True)
shutil.copy(config_path, os.path.join(out, "config.json"))
config = AutoConfig.from_pretrained(out)
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(device):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.realpath(os.path.join(tok_dir, f)), os.path.join(out, f))
print("saved", out, sum(p.numel() for p in model.parameters()), "parameters")
