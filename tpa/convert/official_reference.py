"""The forward pass of the paper's code (github tensorgi/T6), on its own tensors, in its own conventions.

The reference twin of ``tpa convert official``: it computes an official checkpoint's logits from the
official state dict alone, so comparing it with our model on the converted weights tests the
mapping. Written from the conventions the official model files follow (nothing shared with
:mod:`tpa.layers`):

- Blocks ``x += attn(n(x))``, ``x += mlp(n(x))``, a final ``n(x)``, logits ``x W_lm^T``; ``n`` is an
  RMS norm without gain whose epsilon is the machine epsilon of the dtype it runs in.
- SwiGLU ``c_proj(silu(c_fc1 x) * c_fc2 x)``.
- RoPE pairs feature ``i`` with ``i + r/2`` over the first ``r`` features and rotates by *minus* the
  angle: ``y1 = x1 cos + x2 sin``, ``y2 = -x1 sin + x2 cos``, angles ``t / 10000^(2i/r)``.
  (The official tables are rounded to bfloat16; here they are exact in the working dtype.)
- TPA head factors ``A = x W_A^T`` viewed ``[H, R]`` (row ``h*R + r``), feature factors ``B = x W_B^T``
  viewed ``[R, D]``; ``q = A B / R_q``, ``k = A_k B_k / R``, ``v = A_v B_v / R`` with one ``R`` for
  K and V; RoPE on ``B_q`` and ``B_k`` (on ``q`` itself for T6_kvonly).
- MHA/GQA heads are consecutive ``D``-row blocks; GQA query head ``h`` reads K/V head ``h // group``.
- MLA (DeepSeek-V2 layout): ``q = q_b(rms_1e-6(q_a x))`` per head ``[D nope | r rope]``,
  ``[c_kv | k_pe] = kv_a x``, ``kv_b(rms_1e-6(c_kv))`` per head ``[D nope | E value]``, one shared
  rotated ``k_pe``, softmax scale ``(D + r) ** -0.5``; the latent norms have gains, run in float32.
- ``using_groupnorm``: each head's attention output goes through an RMS norm with gain, eps 1e-5.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from tpa.convert.official_spec import OfficialModel


def _rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` in at least float32, cast back, then times ``weight``."""
    work = torch.promote_types(x.dtype, torch.float32)
    y = x.to(work)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def _rope_minus(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Official RoPE on ``x [B, T, *, D]``: the first ``rotary_dim`` features, rotated by minus the angle."""
    seq = x.shape[1]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq  # [T, r/2]
    shape = (1, seq) + (1,) * (x.dim() - 3) + (rotary_dim // 2,)
    cos, sin = angles.cos().to(x.dtype).reshape(shape), angles.sin().to(x.dtype).reshape(shape)
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest], dim=-1)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention, ``q, k [B, T, H, D]``, ``v [B, T, H, E]`` -> ``[B, T, H, E]``."""
    seq = q.shape[1]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhe->bqhe", weights, v)


def _linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return x @ w[name].T


def _tpa_qkv(spec: OfficialModel, w: dict, a: str, x: torch.Tensor):
    bsz, seq, _ = x.shape
    h, d, rk = spec.n_head, spec.head_dim, spec.rank

    def product(kind: str, rank: int, rotate: bool) -> torch.Tensor:
        heads = _linear(x, w, f"{a}c_qkv.W_A_{kind}.weight").view(bsz, seq, h, rank)
        feats = _linear(x, w, f"{a}c_qkv.W_B_{kind}.weight").view(bsz, seq, rank, d)
        if rotate:
            feats = _rope_minus(feats, spec.rotary_dim)
        return torch.einsum("bthr,btrd->bthd", heads, feats) / rank

    if spec.kind == "T6":
        q = product("q", spec.q_rank, rotate=True)
    else:
        q = _rope_minus(_linear(x, w, f"{a}c_qkv.c_q.weight").view(bsz, seq, h, d), spec.rotary_dim)
    return q, product("k", rk, rotate=True), product("v", rk, rotate=False)


def _heads_qkv(spec: OfficialModel, w: dict, a: str, x: torch.Tensor):
    bsz, seq, _ = x.shape
    h, g, d = spec.n_head, spec.n_kv_head, spec.head_dim
    q = _rope_minus(_linear(x, w, a + "c_q.weight").view(bsz, seq, h, d), spec.rotary_dim)
    k = _rope_minus(_linear(x, w, a + "c_k.weight").view(bsz, seq, g, d), spec.rotary_dim)
    v = _linear(x, w, a + "c_v.weight").view(bsz, seq, g, d)
    return q, k.repeat_interleave(h // g, dim=2), v.repeat_interleave(h // g, dim=2)


def _mla_qkv(spec: OfficialModel, w: dict, a: str, x: torch.Tensor):
    bsz, seq, _ = x.shape
    h, d, r, e, dc = spec.n_head, spec.head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    latent_q = _rms(_linear(x, w, a + "q_a_proj.weight"), 1e-6, w[a + "q_a_layernorm.weight"])
    q = _linear(latent_q, w, a + "q_b_proj.weight").view(bsz, seq, h, d + r)
    q = torch.cat([q[..., :d], _rope_minus(q[..., d:], r)], dim=-1)
    compressed = _linear(x, w, a + "kv_a_proj_with_mqa.weight")
    c_kv, k_pe = compressed[..., :dc], compressed[..., dc:]
    k_pe = _rope_minus(k_pe.view(bsz, seq, 1, r), r)
    kv = _linear(_rms(c_kv, 1e-6, w[a + "kv_a_layernorm.weight"]), w, a + "kv_b_proj.weight").view(bsz, seq, h, d + e)
    k = torch.cat([kv[..., :d], k_pe.expand(bsz, seq, h, r)], dim=-1)
    return q, k, kv[..., d:]


def official_forward(spec: OfficialModel, weights: dict[str, torch.Tensor], input_ids: torch.Tensor,
                     norm_eps: float | None = None) -> torch.Tensor:
    """Logits ``[B, T, V]`` of the official model ``spec`` with ``weights`` (the official state dict) on
    ``input_ids [B, T]``, computed in the weights' dtype (no padding, positions 0..T-1).

    ``norm_eps``: epsilon of the gain-free block and final norms; default the machine epsilon of the
    weights' dtype, as the official code gets it (pass float32's to evaluate in float64 what the
    official model computes with float32 residuals).
    """
    w = weights
    embed = w.get("transformer.wte.weight", w.get("lm_head.weight"))
    head = w.get("lm_head.weight", embed)
    x = embed[input_ids]
    eps = torch.finfo(x.dtype).eps if norm_eps is None else norm_eps
    qkv = {"T6": _tpa_qkv, "T6_kvonly": _tpa_qkv, "llama-mla": _mla_qkv}.get(spec.kind, _heads_qkv)
    scale = (spec.head_dim + (spec.qk_rope_head_dim if spec.kind == "llama-mla" else 0)) ** -0.5
    for i in range(spec.n_layer):
        p = f"transformer.h.{i}."
        q, k, v = qkv(spec, w, p + "attn.", _rms(x, eps))
        y = _causal_attention(q, k, v, scale)
        if spec.using_groupnorm:
            y = _rms(y, 1e-5, w[p + "attn.subln.weight"])
        x = x + _linear(y.flatten(2), w, p + "attn.c_proj.weight")
        hidden = _rms(x, eps)
        gated = F.silu(_linear(hidden, w, p + "mlp.c_fc1.weight")) * _linear(hidden, w, p + "mlp.c_fc2.weight")
        x = x + _linear(gated, w, p + "mlp.c_proj.weight")
    return _rms(x, eps) @ head.T
