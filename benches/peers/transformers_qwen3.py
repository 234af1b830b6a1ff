#!/usr/bin/env python3
"""Peer benchmark: transformers on the same random-weight Qwen3 checkpoint and token ids that
inference-pio is given, in the same device call.

    python3 transformers_qwen3.py --make-checkpoint DIR --config config.json --tokenizer-dir TOKDIR
    python3 transformers_qwen3.py --model DIR --prompt-tokens 128 --new-tokens 64 --out peer.json
"""
import argparse
import json
import os
import shutil
import resource
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM


def prompt_ids(n):
    # Same ids as benches/src/main.rs (pio-bench).
    return [1000 + (i * 7919) % 20000 for i in range(n)]


def make_checkpoint(out, config_path, tokenizer_dir, device):
    cfg = json.load(open(config_path))
    config = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(tokenizer_dir, f), out)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(model_dir, prompt_tokens, new_tokens, batch, device, dtype, gguf=None):
    if gguf:
        # A GGUF file (dequantized by transformers), e.g. the built-in default model.
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=dtype)
        model = model.to(device).eval()
    else:
        # The class from the checkpoint's `architectures` (dense Qwen3 or Qwen3-MoE).
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt_ids(prompt_tokens)] * batch, device=device)
    res = {}

    def generate(n):
        sync(device)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - t, out

    with torch.no_grad():
        # Prefill as generation does it: logits of the last position only.
        for _ in range(2):  # warm-up
            model(ids, logits_to_keep=1)
        sync(device)
        t = time.perf_counter()
        model(ids, logits_to_keep=1)
        sync(device)
        res["prefill_tokens_per_s"] = prompt_tokens * batch / (time.perf_counter() - t)
        generate(2)
        first, _ = generate(1)
        total, out = generate(new_tokens)
    # Decode rate: the steps after the first token (as inference-pio reports it).
    res["time_to_first_token_s"] = first
    res["decode_tokens_per_s"] = (new_tokens - 1) * batch / (total - first)
    res["generated"] = out.shape[1] - prompt_tokens
    if device == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-checkpoint")
    ap.add_argument("--config")
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--model")
    ap.add_argument("--gguf", help="benchmark this GGUF file instead of --model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.make_checkpoint:
        make_checkpoint(a.make_checkpoint, a.config, a.tokenizer_dir, a.device)
    else:
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        r = bench(a.model, a.prompt_tokens, a.new_tokens, a.batch, a.device, dtype, gguf=a.gguf)
        name = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        r.update(device=name, torch=torch.__version__, dtype=a.dtype, prompt_tokens=a.prompt_tokens,
                 new_tokens=a.new_tokens, batch=a.batch, mode="eager", peer="transformers")
        text = json.dumps(r, indent=1)
        print(text)
        if a.out:
            open(a.out, "w").write(text)
