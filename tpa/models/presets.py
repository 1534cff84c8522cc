"""The attention types and model sizes of T6, as plain Python (no torch, no transformers), so that the
command line and the training configuration can name them without importing a model.

Presets follow the paper: layers and width from Table 9, head_dim 64, head counts per attention type
from Table 10 (so every type has about MHA's attention parameters). ``tiny`` and ``mini`` are
CPU-sized presets whose head counts are derived by the same parameter matching.
"""

from __future__ import annotations

import math

ATTENTION_TYPES = ("tpa", "tpa_kvonly", "mha", "gqa", "mqa", "mla")

# name: (layers, hidden_size, head_dim, MHA heads, d_c, d'_c, max_position_embeddings)
_SIZES = {
    "tiny": (4, 128, 32, 4, 64, 128, 1024),
    "mini": (8, 512, 64, 8, 128, 256, 1024),
    "small": (12, 768, 64, 12, 256, 512, 2048),
    "medium": (24, 1024, 64, 16, 512, 1024, 2048),
    "large": (36, 1280, 64, 20, 512, 1024, 2048),
    "xl": (48, 1600, 64, 25, 512, 1024, 2048),
}
# Table 10 of the paper: heads per attention type for the paper's sizes.
_TABLE10_HEADS = {
    "small": {"mha": 12, "mqa": 23, "gqa": 22, "mla": 12, "tpa_kvonly": 22, "tpa": 34},
    "medium": {"mha": 16, "mqa": 31, "gqa": 30, "mla": 23, "tpa_kvonly": 29, "tpa": 47},
    "large": {"mha": 20, "mqa": 39, "gqa": 38, "mla": 34, "tpa_kvonly": 37, "tpa": 61},
    "xl": {"mha": 25, "mqa": 49, "gqa": 48, "mla": 49, "tpa_kvonly": 47, "tpa": 78},
}
PRESETS = tuple(_SIZES)


def _swiglu_width(hidden_size: int) -> int:
    """``8/3 * C`` rounded up to a multiple of 64 (LLaMA's SwiGLU sizing)."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


def attention_parameters(attention_type: str, d_model: int, heads: int, head_dim: int, *, q_rank=6, k_rank=2,
                         v_rank=2, kv_heads=2, d_c=0, d_c_q=0, d_rope=32, v_head_dim=None) -> int:
    """Table 1's parameter count of one attention layer (projection matrices, output included).

    ``v_head_dim`` (MLA only): the value head size E (default ``head_dim``).
    """
    h, d = heads, head_dim
    e = head_dim if v_head_dim is None else v_head_dim
    if attention_type == "mha":
        return 4 * d_model * h * d
    if attention_type == "mqa":
        return 2 * d_model * d * (h + 1)
    if attention_type == "gqa":
        return 2 * d_model * d * (h + kv_heads)
    if attention_type == "mla":
        return d_c_q * (d_model + h * d + h * d_rope) + d_c * (d_model + h * d + h * e) + d_model * (h * e + d_rope)
    if attention_type == "tpa":
        return d_model * (q_rank + k_rank + v_rank) * (h + d) + d_model * h * d
    if attention_type == "tpa_kvonly":
        return d_model * (k_rank + v_rank) * (h + d) + 2 * d_model * h * d
    raise ValueError(f"unknown attention_type {attention_type!r}; expected one of {ATTENTION_TYPES}")


def matched_heads(attention_type: str, d_model: int, head_dim: int, mha_heads: int, **kw) -> int:
    """The head count (>= 1) whose attention parameter count is closest to MHA's with ``mha_heads``."""
    target = attention_parameters("mha", d_model, mha_heads, head_dim)
    best = min(range(1, 8 * mha_heads + 8), key=lambda h: abs(attention_parameters(attention_type, d_model, h,
                                                                                      head_dim, **kw) - target))
    return best
