#!/usr/bin/env python3
"""A random-weight bf16 checkpoint of a real config, saved as an HF model directory, so every
peer in a benchmark call (ours, transformers, llama.cpp through its GGUF converter) loads the
same weights. Weights ~ N(0, 0.02) as transformers initialises them, built on the GPU.

    python3 make_random_checkpoint.py CONFIG.json TOKENIZER_DIR OUT_DIR [--layers N]

--layers N keeps the config's first N decoder layers (num_hidden_layers = N): issue 20 lets
the Qwen3-Coder-30B-A3B comparison with llama.cpp use 12 of its 48 layers, both engines on the
same file, because a full 61 GB checkpoint and its GGUF do not fit the GPU machine's disk.

Qwen3-MoE (`model_type` qwen3_moe) is written tensor by tensor in the layout of Qwen's own
checkpoints (one `mlp.experts.E.{gate,up,down}_proj.weight` per expert), in shards with an
index, without building the model: transformers 5 keeps experts fused in memory, and the file
both peers read must not depend on how it writes them back.
"""
import json
import os
import shutil
import sys

import torch


def save_moe(config, out, device):
    from safetensors.torch import save_file

    h, v = config["hidden_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    e, inter = config["num_experts"], config["moe_intermediate_size"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    index, shard, shard_bytes, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if not shard:
            return
        n_shard += 1
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        for k in shard:
            index[k] = name
        shard, shard_bytes = {}, 0

    def put(name, t):
        nonlocal shard_bytes, total
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel()
        if shard_bytes >= 4 << 30:
            flush()

    put("model.embed_tokens.weight", rand(v, h))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", ones(h))
        put(p + "post_attention_layernorm.weight", ones(h))
        put(p + "self_attn.q_proj.weight", rand(nh * hd, h))
        put(p + "self_attn.k_proj.weight", rand(nkv * hd, h))
        put(p + "self_attn.v_proj.weight", rand(nkv * hd, h))
        put(p + "self_attn.o_proj.weight", rand(h, nh * hd))
        put(p + "self_attn.q_norm.weight", ones(hd))
        put(p + "self_attn.k_norm.weight", ones(hd))
        put(p + "mlp.gate.weight", rand(e, h))
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            put(q + "gate_proj.weight", rand(inter, h))
            put(q + "up_proj.weight", rand(inter, h))
            put(q + "down_proj.weight", rand(h, inter))
    put("model.norm.weight", ones(h))
    if not config.get("tie_word_embeddings", False):
        put("lm_head.weight", rand(v, h))
    flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": index}, f, indent=1)
    return total


def main():
    args = sys.argv[1:]
    layers = None
    if "--layers" in args:
        i = args.index("--layers")
        layers = int(args[i + 1])
        del args[i : i + 2]
    config_path, tok_dir, out = args[:3]
    os.makedirs(out, exist_ok=True)
    config = json.load(open(config_path))
    if layers is not None:
        if not 0 < layers <= config["num_hidden_layers"]:
            sys.exit(f"--layers {layers}: the config has {config['num_hidden_layers']} layers")
        config["num_hidden_layers"] = layers
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][:layers]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.get("model_type") == "qwen3_moe":
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1 or config.get("shared_expert_intermediate_size", 0):
            sys.exit("qwen3_moe writer: only configs with every layer sparse and no shared expert")
        total = save_moe(config, out, device)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        total = sum(p.numel() for p in model.parameters())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.realpath(os.path.join(tok_dir, f)), os.path.join(out, f))
    print("saved", out, total, "parameters")


if __name__ == "__main__":
    main()
