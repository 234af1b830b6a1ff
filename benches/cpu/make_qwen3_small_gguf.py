#!/usr/bin/env python3
"""Make random-weight Qwen3 GGUF files for the CPU benchmark against llama.cpp.

Issue "The built-in model on the CPU": to compare our engine with llama.cpp on
the CPU, both must run the *same* quantized files.  This script

  (a) writes a random-weight Hugging Face checkpoint of the shape in
      benches/configs/qwen3-small.json (Qwen3ForCausalLM, ~0.11 B parameters):
      config.json (copied as is, so tie_word_embeddings / torch_dtype are the
      config's), model.safetensors with every parameter Qwen3ForCausalLM has for
      that config (normal(0, 0.02) matrices, ones for the RMSNorm weights, seeded
      numpy RNG, stored as the config's torch_dtype), and the Qwen3 tokenizer
      files from the qwen3-4b-instruct-2507 plugin's test fixtures;
  (b) converts it with llama.cpp's own convert_hf_to_gguf.py
      (--outtype bf16 or f32, following the config's torch_dtype unless
      --outtype is given) to OUT/qwen3-small-<outtype>.gguf;
  (c) quantizes that with llama.cpp's llama-quantize to Q4_1, Q4_0, Q8_0 and
      Q4_K_M: OUT/qwen3-small-<type>.gguf.

The weights are random, so the files are for speed only, not for output quality.
The vocabulary of the fixture tokenizer (151,669 ids) is smaller than the
config's vocab_size (151,936); the converter pads the rest with [PAD<n>] tokens,
as it does for the real Qwen3 checkpoints.

llama.cpp's converter imports torch.  Without a CPU torch wheel at hand, the
PyPI torch wheel (with its CUDA libraries; CUDA itself is never used) can be
installed outside the main disk and named with --torch-path, e.g.
    TMPDIR=/dev/shm/tmp pip install --no-cache-dir --target /dev/shm/torchenv torch==2.11.0
    python3 benches/cpu/make_qwen3_small_gguf.py --torch-path /dev/shm/torchenv

Needs: numpy; for the converter also transformers (tokenizer only),
sentencepiece and torch.  llama.cpp built for the CPU in --llama
(build/bin/llama-quantize).

Without torch, --direct replaces (b): the same random checkpoint is written
straight to OUT/qwen3-small-<outtype>.gguf with gguf-py (pip install gguf), in
the converter's layout (`qwen3` tensor names and keys, the tokenizer as a
`gpt2` vocabulary with pre-tokenizer `qwen2`, padded to vocab_size), and (c)
quantizes it as before.

Usage:
    python3 benches/cpu/make_qwen3_small_gguf.py [--direct] [--out DIR] [--llama DIR]
        [--config FILE] [--tokenizer DIR] [--seed N] [--outtype bf16|f32]
        [--types Q4_1,Q4_1-pure,Q4_0,Q8_0,Q4_K_M] [--threads N] [--torch-path DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "benches" / "configs" / "qwen3-small.json"
DEFAULT_TOKENIZER = (
    REPO / "plugins" / "qwen3-4b-instruct-2507" / "tests" / "fixtures" / "qwen3-tokenizer"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
DEFAULT_TYPES = ("Q4_1", "Q4_1-pure", "Q4_0", "Q8_0", "Q4_K_M")


def qwen3_parameters(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every parameter of transformers' Qwen3ForCausalLM.

    Shapes are PyTorch's nn.Linear layout (out_features, in_features).
    init is "normal" (N(0, 0.02)), "ones" (RMSNorm weights) or "zeros" (biases).
    """
    h = cfg["hidden_size"]
    ff = cfg["intermediate_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    hd = cfg.get("head_dim") or h // n_heads
    vocab = cfg["vocab_size"]
    bias = bool(cfg.get("attention_bias", False))

    params: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (vocab, h), "normal"),
    ]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = [
            ("q_proj", (n_heads * hd, h)),
            ("k_proj", (n_kv * hd, h)),
            ("v_proj", (n_kv * hd, h)),
        ]
        for proj, shape in attn:
            params.append((p + f"self_attn.{proj}.weight", shape, "normal"))
            if bias:
                params.append((p + f"self_attn.{proj}.bias", (shape[0],), "zeros"))
        params.append((p + "self_attn.o_proj.weight", (h, n_heads * hd), "normal"))
        if bias:
            params.append((p + "self_attn.o_proj.bias", (h,), "zeros"))
        params += [
            (p + "self_attn.q_norm.weight", (hd,), "ones"),
            (p + "self_attn.k_norm.weight", (hd,), "ones"),
            (p + "mlp.gate_proj.weight", (ff, h), "normal"),
            (p + "mlp.up_proj.weight", (ff, h), "normal"),
            (p + "mlp.down_proj.weight", (h, ff), "normal"),
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
        ]
    params.append(("model.norm.weight", (h,), "ones"))
    if not cfg.get("tie_word_embeddings", False):
        params.append(("lm_head.weight", (vocab, h), "normal"))
    return params


def f32_to_bf16_bytes(x: np.ndarray) -> bytes:
    """Round-to-nearest-even f32 -> bf16, as torch does (no NaNs here)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype("<u2").tobytes()


def draw(rng, shape, init: str) -> np.ndarray:
    """One parameter's values: N(0, 0.02), ones or zeros, f32."""
    if init == "normal":
        t = rng.standard_normal(shape, dtype=np.float32)
        t *= np.float32(0.02)
        return t
    return (np.ones if init == "ones" else np.zeros)(shape, dtype=np.float32)


def write_safetensors(path: Path, params, dtype: str, seed: int) -> int:
    """Stream the tensors into a safetensors file (no torch needed); returns the count."""
    if dtype not in ("F32", "BF16"):
        raise SystemExit(f"unsupported checkpoint dtype {dtype}")
    itemsize = 4 if dtype == "F32" else 2
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in params:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # align the data start to 8 bytes

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for name, shape, init in params:
            t = draw(rng, shape, init)
            f.write(t.astype("<f4").tobytes() if dtype == "F32" else f32_to_bf16_bytes(t))
            del t
    return len(params)


# The model-level tensors' GGUF names; a layer's come from the Qwen3-MoE fixture writer's
# `LAYER_NAMES` (imported where the direct writer runs: it needs gguf-py, the converter path not).
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(name: str, layer_names: dict) -> str:
    """The GGUF tensor name llama.cpp's converter gives a Qwen3 parameter."""
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    stem, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{layer_names[stem]}.{kind}"


def write_gguf_direct(path: Path, cfg: dict, hf: Path, params, outtype: str, seed: int) -> None:
    """The checkpoint of `write_safetensors` (same seed, same values) as a GGUF file of
    `outtype`, in convert_hf_to_gguf.py's layout for Qwen3, the tokenizer from `hf`."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    sys.path.insert(0, str(REPO / "plugins" / "qwen3-coder-30b" / "tests" / "fixtures"))
    from make_gguf_fixtures import LAYER_NAMES

    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [TokenType.UNUSED] * vocab
    for text, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    h = cfg["hidden_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    w = GGUFWriter(str(path), "qwen3")
    w.add_name("qwen3-small")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(0 if outtype == "f32" else 32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType.F32 if outtype == "f32" else GGMLQuantizationType.BF16
    for name, shape, init in params:
        values = draw(rng, shape, init)
        if qtype == GGMLQuantizationType.F32 or values.ndim == 1:
            w.add_tensor(gguf_name(name, LAYER_NAMES), values)
        else:
            raw = np.frombuffer(f32_to_bf16_bytes(values), dtype=np.uint8).reshape(*shape[:-1], shape[-1] * 2)
            w.add_tensor(gguf_name(name, LAYER_NAMES), raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def convert(args, hf: Path, base: Path, outtype: str) -> None:
    """llama.cpp's convert_hf_to_gguf.py on the checkpoint in `hf`, into `base`."""
    env = dict(os.environ)
    pp = [str(args.llama / "gguf-py")]
    if args.torch_path:
        pp.append(args.torch_path)
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pp)
    run([sys.executable, str(args.llama / "convert_hf_to_gguf.py"), str(hf),
         "--outtype", outtype, "--outfile", str(base)], env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen3-small-gguf"))
    ap.add_argument("--llama", type=Path, default=Path("/tmp/llama-cpu"))
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outtype", choices=("bf16", "f32"), default=None,
                    help="converter output type (default: the config's torch_dtype)")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES),
                    help="llama-quantize types, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="llama-quantize threads")
    ap.add_argument("--direct", action="store_true",
                    help="write the GGUF with gguf-py instead of the converter (no torch)")
    ap.add_argument("--torch-path", default=None,
                    help="extra PYTHONPATH entry holding torch, for the converter")
    args = ap.parse_args()

    cfg = json.loads(args.config.read_text())
    torch_dtype = cfg.get("torch_dtype", "float32")
    st_dtype = {"bfloat16": "BF16", "float32": "F32"}.get(torch_dtype)
    if st_dtype is None:
        raise SystemExit(f"config torch_dtype {torch_dtype!r} not handled (bfloat16 or float32)")
    outtype = args.outtype or ("bf16" if st_dtype == "BF16" else "f32")

    out = args.out
    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)

    # (a) the HF checkpoint
    shutil.copyfile(args.config, hf / "config.json")
    copied = []
    for fname in TOKENIZER_FILES:
        src = args.tokenizer / fname
        if src.exists():
            shutil.copyfile(src, hf / fname)
            copied.append(fname)
    if "tokenizer.json" not in copied:
        raise SystemExit(f"no tokenizer.json in {args.tokenizer}")
    tok = json.loads((hf / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    n_tok = max(ids) + 1
    if n_tok > cfg["vocab_size"]:
        raise SystemExit(f"tokenizer has {n_tok} ids, more than vocab_size {cfg['vocab_size']}")

    params = qwen3_parameters(cfg)
    n_params = sum(int(np.prod(s)) for _, s, _ in params)
    print(f"writing {hf}/model.safetensors: {len(params)} tensors, {n_params / 1e6:.1f} M parameters, "
          f"{st_dtype}, seed {args.seed}; tokenizer ids {n_tok} (vocab_size {cfg['vocab_size']}), "
          f"tokenizer files {copied}", flush=True)
    write_safetensors(hf / "model.safetensors", params, st_dtype, args.seed)

    # (b) llama.cpp's converter, or the same layout written here
    base = out / f"qwen3-small-{outtype}.gguf"
    if args.direct:
        write_gguf_direct(base, cfg, hf, params, outtype, args.seed)
    else:
        convert(args, hf, base, outtype)

    # (c) llama.cpp's quantizer
    quantize = args.llama / "build" / "bin" / "llama-quantize"
    for qtype in [t.strip() for t in args.types.split(",") if t.strip()]:
        # "T-pure": every matrix in T, the tied embedding/output too (llama-quantize --pure;
        # otherwise Q4_0/Q4_1 files keep that one tensor in Q6_K).
        pure = qtype.endswith("-pure")
        flags = ["--pure"] if pure else []
        run([str(quantize), *flags, str(base), str(out / f"qwen3-small-{qtype}.gguf"), qtype.removesuffix("-pure"), str(args.threads)])

    for p in sorted(out.glob("*.gguf")):
        print(f"{p}  {p.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
