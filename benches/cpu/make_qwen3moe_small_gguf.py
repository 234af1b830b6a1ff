#!/usr/bin/env python3
"""Random-weight Qwen3-MoE GGUF files for the CPU benchmark against llama.cpp.

A small `qwen3moe` model (llama.cpp's layout, as `convert_hf_to_gguf.py` writes Qwen3-MoE:
routers `ffn_gate_inp`, experts stacked in `ffn_{gate,up,down}_exps`), written directly with
gguf-py from normal(0, 0.02) weights (seeded numpy), so both engines run the same bytes:
hidden 768, 8 layers, 12 query heads and 4 key/value heads of 64, 32 experts of 256 with top-4,
a 32,768-entry vocabulary (the tests' tiny byte-level BPE, padded with unused tokens). Types: F32, Q8_0, Q4_0 (every
matrix; norms and routers F32).

The weights are random: the files are for speed only.

    pip install gguf numpy
    python3 benches/cpu/make_qwen3moe_small_gguf.py [--out DIR] [--seed N] [--types F32,Q8_0,Q4_0] [--size small|medium]
"""

import argparse
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../plugins/qwen3-coder-30b/tests/fixtures"))
from make_gguf_fixtures import add_tensor, finish, tiny_tokenizer  # noqa: E402

SHAPES = {
    "small": dict(hidden=768, layers=8, heads=12, kv_heads=4, head_dim=64, experts=32, top_k=4, moe_inner=256, vocab=32768, context=4096),
    # Qwen3-Coder-30B-A3B's layer shapes (hidden 2,048, 32 query and 4 key/value heads of 128,
    # experts of 768, top-8) with 12 of its 48 layers and 64 of its 128 experts: about 3.6 B
    # parameters, 2 GB in Q4_0, so a token's experts are read from memory as a real model's are.
    "medium": dict(hidden=2048, layers=12, heads=32, kv_heads=4, head_dim=128, experts=64, top_k=8, moe_inner=768, vocab=32768, context=4096),
}


def tensors(s, seed):
    """(name, values) of every tensor, drawn one after another (a medium file's f64 values
    would not fit in memory at once)."""
    rng = np.random.default_rng(seed)
    h, d = s["hidden"], s["head_dim"]
    yield "token_embd.weight", rng.normal(0, 0.02, (s["vocab"], h))
    yield "output_norm.weight", np.ones(h)
    yield "output.weight", rng.normal(0, 0.02, (s["vocab"], h))
    for l in range(s["layers"]):
        b = f"blk.{l}."
        yield b + "attn_norm.weight", np.ones(h)
        yield b + "ffn_norm.weight", np.ones(h)
        yield b + "attn_q.weight", rng.normal(0, 0.02, (s["heads"] * d, h))
        yield b + "attn_k.weight", rng.normal(0, 0.02, (s["kv_heads"] * d, h))
        yield b + "attn_v.weight", rng.normal(0, 0.02, (s["kv_heads"] * d, h))
        yield b + "attn_output.weight", rng.normal(0, 0.02, (h, s["heads"] * d))
        yield b + "attn_q_norm.weight", np.ones(d)
        yield b + "attn_k_norm.weight", np.ones(d)
        yield b + "ffn_gate_inp.weight", rng.normal(0, 0.02, (s["experts"], h))
        yield b + "ffn_gate_exps.weight", rng.normal(0, 0.02, (s["experts"], s["moe_inner"], h))
        yield b + "ffn_up_exps.weight", rng.normal(0, 0.02, (s["experts"], s["moe_inner"], h))
        yield b + "ffn_down_exps.weight", rng.normal(0, 0.02, (s["experts"], h, s["moe_inner"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/qwen3moe-small")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--types", default="F32,Q8_0,Q4_0")
    ap.add_argument("--size", choices=sorted(SHAPES), default="small")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    s = SHAPES[a.size]
    h, d = s["hidden"], s["head_dim"]
    for t in a.types.split(","):
        qtype = getattr(Q, t)
        path = os.path.join(a.out, f"qwen3moe-{a.size}-{t}.gguf")
        w = GGUFWriter(path, "qwen3moe")
        w.add_name(f"qwen3moe-{a.size}")
        w.add_context_length(s["context"])
        w.add_embedding_length(h)
        w.add_block_count(s["layers"])
        w.add_feed_forward_length(s["moe_inner"] * 4)
        w.add_head_count(s["heads"])
        w.add_head_count_kv(s["kv_heads"])
        w.add_key_length(d)
        w.add_value_length(d)
        w.add_rope_dimension_count(d)
        w.add_rope_freq_base(1e6)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_expert_count(s["experts"])
        w.add_expert_used_count(s["top_k"])
        w.add_expert_feed_forward_length(s["moe_inner"])
        w.add_file_type(0 if t == "F32" else (7 if t == "Q8_0" else 2))
        tiny_tokenizer(w, s["vocab"])
        for name, v in tensors(s, a.seed):
            add_tensor(w, name, v, Q.F32 if (v.ndim == 1 or "ffn_gate_inp" in name) else qtype)
        finish(w)
        print("wrote", path, os.path.getsize(path) // (1 << 20), "MiB")


if __name__ == "__main__":
    main()
