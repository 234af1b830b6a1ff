#!/usr/bin/env python3
"""Peer benchmark: transformers on a random-weight model built on the GPU from a real
config.json (dense Qwen3, Qwen3-MoE or GLM-4.x MoE), with the token ids inference-pio gets
(benches/src/main.rs), in the same device call, bf16. Prefill at each --prompt-tokens; decode at
batch 1 and at each --batches size (every row the same prompt, as `pio-bench --batch`).

--mode eager: dynamic cache, eager forward. --mode static: a StaticCache of one fixed length for
every generate call (so the decode step compiles once) and transformers' automatic
torch.compile of the decode forward, as `cache_implementation="static"` does.

    python3 transformers_moe.py --config plugins/qwen3-coder-30b/primary/config.json --out peer.json
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def prompt_ids(n):
    return [1000 + (i * 7919) % 20000 for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="*", default=[], help="further decode batch sizes")
    ap.add_argument("--mode", choices=["eager", "static"], default="eager")
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})
    torch.manual_seed(0)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t
    res = {"peer": "transformers", "mode": a.mode, "build_s": build_s, "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "transformers": __import__("transformers").__version__, "config": a.config}
    with torch.no_grad():
        for n in a.prompt_tokens:
            ids = torch.tensor([prompt_ids(n)], device="cuda")
            model(ids, logits_to_keep=1)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids, logits_to_keep=1)
            torch.cuda.synchronize()
            res[f"prefill_{n}_tokens_per_s"] = n / (time.perf_counter() - t)
            res[f"peak_gpu_mib_prefill_{n}"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()

        def generate(ids, n):
            extra = {}
            if a.mode == "static":
                from transformers import StaticCache
                extra["past_key_values"] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + a.new_tokens + 8)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
            torch.cuda.synchronize()
            return time.perf_counter() - t

        for batch in [1] + [b for b in a.batches if b != 1]:
            ids = torch.tensor([prompt_ids(a.prompt_tokens[0])] * batch, device="cuda")
            t = time.perf_counter()
            generate(ids, 3)  # warm-up (static: compiles the decode step)
            warmup = time.perf_counter() - t
            generate(ids, 3)
            first = generate(ids, 1)
            total = generate(ids, a.new_tokens)
            rate = batch * (a.new_tokens - 1) / (total - first)
            res[f"decode_batch_{batch}_tokens_per_s"] = rate
            res[f"peak_gpu_mib_batch_{batch}"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            if batch == 1:
                res["warmup_s"] = warmup
                res["decode_tokens_per_s"] = rate
                res["time_to_first_token_s"] = first
    res["peak_gpu_mib"] = max(v for k, v in res.items() if k.startswith("peak_gpu_mib_"))
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
