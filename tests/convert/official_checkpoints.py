"""Checkpoint directories in the layout the paper's code (github tensorgi/T6) saves, from known tensors.

``config.json`` holds what its ``train_adam.py`` passes to ``GPTConfig`` (``group_size`` only for the
GQA file, never MLA's latent sizes) with ``model_type "gpt2"``; ``pytorch_model.bin`` is a
``torch.save`` of the state dict, both tied embedding names included. Shapes are spelled out here
from the official model files, independently of ``tpa.convert``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

KINDS = ("T6", "T6_kvonly", "llama-mha", "llama-gqa", "llama-mqa", "llama-mla")
# tiny sizes per kind: n_head, head_dim (llama-mha: n_embd / n_head), ranks, group size
BASE = dict(n_layer=2, n_embd=40, vocab_size=61, block_size=32)  # SwiGLU width 106, not a multiple of 64
SIZES = {
    "T6": dict(n_head=5, head_dim=8, rank=2, q_rank=3),
    "T6_kvonly": dict(n_head=5, head_dim=8, rank=3, q_rank=12),
    "llama-mha": dict(n_head=4, head_dim=64, rank=1, q_rank=1),  # head_dim is ignored by llama-mha
    "llama-gqa": dict(n_head=6, head_dim=8, rank=1, q_rank=1, group_size=3),
    "llama-mqa": dict(n_head=6, head_dim=8, rank=1, q_rank=1, group_size=6),
    "llama-mla": dict(n_head=3, head_dim=8, rank=1, q_rank=1),
}
# llama-mla's GPTConfig defaults, which the training script never overrides
MLA = dict(q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32, v_head_dim=64)


def official_config(kind: str, **overrides) -> dict:
    config = dict(BASE, **SIZES[kind], bias=False, dropout=0.0, scale_attn_by_inverse_layer_idx=False,
                  using_groupnorm=False, model_type="gpt2", architectures=["GPT"])
    config.update(overrides)
    return config


def official_tensors(kind: str, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of every official name and shape (std 1/sqrt(fan_in), norm gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    c, h, layers = config["n_embd"], config["n_head"], config["n_layer"]
    d = c // h if kind == "llama-mha" else config["head_dim"]
    hidden = math.floor(8 / 3 * c)
    mla = {k: config.get(k, v) for k, v in MLA.items()}

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def gain(n):
        return 1 + 0.2 * torch.randn(n, generator=g)

    embed = torch.randn(config["vocab_size"], c, generator=g)
    out = {"transformer.wte.weight": embed, "lm_head.weight": embed}
    for i in range(layers):
        a = f"transformer.h.{i}.attn."
        value = d
        if kind in ("T6", "T6_kvonly"):
            r = config["rank"]
            if kind == "T6":
                out[a + "c_qkv.W_A_q.weight"] = w(h * config["q_rank"], c)
                out[a + "c_qkv.W_B_q.weight"] = w(config["q_rank"] * d, c)
            else:
                out[a + "c_qkv.c_q.weight"] = w(h * d, c)
            for x in "kv":
                out[a + f"c_qkv.W_A_{x}.weight"] = w(h * r, c)
                out[a + f"c_qkv.W_B_{x}.weight"] = w(r * d, c)
        elif kind == "llama-mla":
            dq, dc, dr, value = mla["q_lora_rank"], mla["kv_lora_rank"], mla["qk_rope_head_dim"], mla["v_head_dim"]
            out[a + "q_a_proj.weight"] = w(dq, c)
            out[a + "q_a_layernorm.weight"] = gain(dq)
            out[a + "q_b_proj.weight"] = w(h * (d + dr), dq)
            out[a + "kv_a_proj_with_mqa.weight"] = w(dc + dr, c)
            out[a + "kv_a_layernorm.weight"] = gain(dc)
            out[a + "kv_b_proj.weight"] = w(h * (d + value), dc)
        else:
            kv_heads = h // config.get("group_size", 1)
            out[a + "c_q.weight"] = w(h * d, c)
            out[a + "c_k.weight"] = w(kv_heads * d, c)
            out[a + "c_v.weight"] = w(kv_heads * d, c)
        out[a + "c_proj.weight"] = w(c, h * value)
        if config.get("using_groupnorm"):
            out[a + "subln.weight"] = gain(value)
        m = f"transformer.h.{i}.mlp."
        out[m + "c_fc1.weight"], out[m + "c_fc2.weight"] = w(hidden, c), w(hidden, c)
        out[m + "c_proj.weight"] = w(c, hidden)
    return out


def write_official_checkpoint(path: Path, kind: str, tensors: dict | None = None, seed: int = 0,
                              **config_overrides) -> tuple[dict, dict]:
    """Write ``config.json`` and ``pytorch_model.bin``; returns ``(config, tensors)``."""
    config = official_config(kind, **config_overrides)
    if kind == "llama-mqa":
        config["group_size"] = config["n_head"]
    tensors = official_tensors(kind, config, seed) if tensors is None else tensors
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    torch.save(tensors, path / "pytorch_model.bin")
    return config, tensors
