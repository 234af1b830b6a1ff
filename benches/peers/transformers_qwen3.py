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
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM


def prompt_ids(n):
    # Same ids as benches/src/main.rs (pio-bench).
    return [1000 + (i * 7919) % 20000 for i in range(n)]


def make_checkpoint(out, config_path, tokenizer_dir):
    cfg = json.load(open(config_path))
    config = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(tokenizer_dir, f), out)


def bench(model_dir, prompt_tokens, new_tokens, batch):
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([prompt_ids(prompt_tokens)] * batch, device="cuda")
    res = {}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            model(ids)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        res["prefill_tokens_per_s"] = prompt_tokens * batch / (time.perf_counter() - t)
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    res["generate_total_s"] = total
    res["decode_tokens_per_s_incl_prefill"] = new_tokens * batch / total
    res["generated"] = out.shape[1] - prompt_tokens
    res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-checkpoint")
    ap.add_argument("--config")
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.make_checkpoint:
        make_checkpoint(a.make_checkpoint, a.config, a.tokenizer_dir)
    else:
        r = bench(a.model, a.prompt_tokens, a.new_tokens, a.batch)
        r.update(device=torch.cuda.get_device_name(), torch=torch.__version__, prompt_tokens=a.prompt_tokens,
                 new_tokens=a.new_tokens, batch=a.batch, mode="eager")
        text = json.dumps(r, indent=1)
        print(text)
        if a.out:
            open(a.out, "w").write(text)
