#!/usr/bin/env python3
"""transformers' continuous batching (`generate_batch`, transformers 5) on the offline
throughput workload of benches/gpu/run_serving_4b.sh: the same prompts file (one JSON list of
token ids per line), greedy, `max_new_tokens`, EOS ignored where the config allows.

    python3 peer_transformers_cb.py MODEL_DIR PROMPTS.jsonl MAX_NEW OUT.json
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

model_dir, prompts_path, max_new, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
prompts = [json.loads(line) for line in open(prompts_path) if line.strip()]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda().eval()
config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
torch.cuda.reset_peak_memory_stats()
# Warm-up on a few prompts (CUDA graphs, kernels), then the timed run.
model.generate_batch(inputs=prompts[:4], generation_config=config)
torch.cuda.synchronize()
start = time.perf_counter()
outputs = model.generate_batch(inputs=prompts, generation_config=config)
torch.cuda.synchronize()
wall = time.perf_counter() - start
generated = sum(len(o.generated_tokens) for o in outputs.values())
prompt_tokens = sum(len(p) for p in prompts)
result = {
    "peer": "transformers generate_batch (continuous batching, paged|sdpa)",
    "transformers": __import__("transformers").__version__,
    "torch": torch.__version__,
    "requests": len(prompts),
    "prompt_tokens": prompt_tokens,
    "output_tokens": generated,
    "wall_s": wall,
    "output_tokens_per_s": generated / wall,
    "total_tokens_per_s": (generated + prompt_tokens) / wall,
    "peak_torch_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
}
json.dump(result, open(out_path, "w"), indent=1)
print(json.dumps(result))
