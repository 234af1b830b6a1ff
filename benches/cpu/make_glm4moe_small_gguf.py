#!/usr/bin/env python3
"""Random-weight GLM-4.x MoE GGUF files for the CPU benchmark against llama.cpp.

A small `glm4moe` model in llama.cpp's layout (as `convert_hf_to_gguf.py`'s `Glm4MoeModel`
writes GLM-4.5/4.6/4.7: routers `ffn_gate_inp` with their score bias `exp_probs_b.bias`,
experts stacked in `ffn_{gate,up,down}_exps`, a shared expert `ffn_*_shexp`, the first layer
dense, q/k/v bias, QK-norm, half the head rotated, `post_attention_norm`), written directly with
gguf-py from normal(0, 0.02) weights (seeded numpy), so both engines run the same bytes:
hidden 768, 8 layers, 12 query heads and 4 key/value heads of 64, 32 experts of 256 with top-4
and one shared expert, sigmoid routing scaled by 2.5 and renormalised (GLM-4.7's), one group,
a 32,768-entry vocabulary (the tests' tiny byte-level BPE, padded; pre-tokenizer `glm4`).
Types: F32, Q8_0, Q4_0 (every matrix; norms, routers and biases F32). No multi-token-prediction
layer (llama.cpp's converter drops it unless asked).

The weights are random: the files are for speed only.

    pip install gguf numpy
    python3 benches/cpu/make_glm4moe_small_gguf.py [--out DIR] [--seed N] [--types F32,Q8_0,Q4_0]
"""

import argparse
import os
import sys

import numpy as np
from gguf import ExpertGatingFuncType, GGMLQuantizationType as Q
from gguf import GGUFWriter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../plugins/qwen3-coder-30b/tests/fixtures"))
from make_gguf_fixtures import add_tensor, finish, tiny_tokenizer  # noqa: E402

SHAPE = dict(hidden=768, layers=8, dense_layers=1, heads=12, kv_heads=4, head_dim=64, experts=32, top_k=4, shared=1,
             moe_inner=256, dense_inner=1536, vocab=32768, context=4096)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/glm4moe-small")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--types", default="F32,Q8_0,Q4_0")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    s = SHAPE
    rng = np.random.default_rng(a.seed)
    h, d = s["hidden"], s["head_dim"]
    tensors = {
        "token_embd.weight": rng.normal(0, 0.02, (s["vocab"], h)),
        "output_norm.weight": np.ones(h),
        "output.weight": rng.normal(0, 0.02, (s["vocab"], h)),
    }
    for l in range(s["layers"]):
        b = f"blk.{l}."
        tensors.update({
            b + "attn_norm.weight": np.ones(h),
            b + "post_attention_norm.weight": np.ones(h),
            b + "attn_q.weight": rng.normal(0, 0.02, (s["heads"] * d, h)),
            b + "attn_k.weight": rng.normal(0, 0.02, (s["kv_heads"] * d, h)),
            b + "attn_v.weight": rng.normal(0, 0.02, (s["kv_heads"] * d, h)),
            b + "attn_q.bias": rng.normal(0, 0.02, s["heads"] * d),
            b + "attn_k.bias": rng.normal(0, 0.02, s["kv_heads"] * d),
            b + "attn_v.bias": rng.normal(0, 0.02, s["kv_heads"] * d),
            b + "attn_output.weight": rng.normal(0, 0.02, (h, s["heads"] * d)),
            b + "attn_q_norm.weight": np.ones(d),
            b + "attn_k_norm.weight": np.ones(d),
        })
        if l < s["dense_layers"]:
            tensors.update({
                b + "ffn_gate.weight": rng.normal(0, 0.02, (s["dense_inner"], h)),
                b + "ffn_up.weight": rng.normal(0, 0.02, (s["dense_inner"], h)),
                b + "ffn_down.weight": rng.normal(0, 0.02, (h, s["dense_inner"])),
            })
        else:
            shexp = s["moe_inner"] * s["shared"]
            tensors.update({
                b + "ffn_gate_inp.weight": rng.normal(0, 0.02, (s["experts"], h)),
                b + "exp_probs_b.bias": rng.normal(0, 0.01, s["experts"]),
                b + "ffn_gate_exps.weight": rng.normal(0, 0.02, (s["experts"], s["moe_inner"], h)),
                b + "ffn_up_exps.weight": rng.normal(0, 0.02, (s["experts"], s["moe_inner"], h)),
                b + "ffn_down_exps.weight": rng.normal(0, 0.02, (s["experts"], h, s["moe_inner"])),
                b + "ffn_gate_shexp.weight": rng.normal(0, 0.02, (shexp, h)),
                b + "ffn_up_shexp.weight": rng.normal(0, 0.02, (shexp, h)),
                b + "ffn_down_shexp.weight": rng.normal(0, 0.02, (h, shexp)),
            })
    for t in a.types.split(","):
        qtype = getattr(Q, t)
        path = os.path.join(a.out, f"glm4moe-small-{t}.gguf")
        w = GGUFWriter(path, "glm4moe")
        w.add_name("glm4moe-small")
        w.add_context_length(s["context"])
        w.add_embedding_length(h)
        w.add_block_count(s["layers"])
        w.add_feed_forward_length(s["dense_inner"])
        w.add_head_count(s["heads"])
        w.add_head_count_kv(s["kv_heads"])
        w.add_key_length(d)
        w.add_value_length(d)
        w.add_rope_dimension_count(d // 2)
        w.add_rope_freq_base(1e6)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_expert_count(s["experts"])
        w.add_expert_used_count(s["top_k"])
        w.add_expert_feed_forward_length(s["moe_inner"])
        w.add_expert_shared_count(s["shared"])
        w.add_leading_dense_block_count(s["dense_layers"])
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(2.5)
        w.add_expert_weights_norm(True)
        w.add_file_type(0 if t == "F32" else (7 if t == "Q8_0" else 2))
        tiny_tokenizer(w, s["vocab"], pre="glm4")
        for name, v in tensors.items():
            add_tensor(w, name, v, Q.F32 if (v.ndim == 1 or "ffn_gate_inp" in name) else qtype)
        finish(w)
        print("wrote", path, os.path.getsize(path) // (1 << 20), "MiB")


if __name__ == "__main__":
    main()
