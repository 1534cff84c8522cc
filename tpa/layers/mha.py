"""Multi-head attention and its key/value-sharing forms: GQA (``num_kv_heads`` groups) and MQA (one)."""

from __future__ import annotations

import torch
from torch import nn

from tpa.layers.base import (Attention, AttentionContext, apply_partial_rotary, attend, check_hidden, check_positive,
                             partial_rotary_dim, scaled_normal_)
from tpa.ops.grouped_decode import grouped_decode
from tpa.ops.step_write import Segment
from tpa.ops.grouped_decode import supports as grouped_decode_supports


class MultiHeadAttention(Attention):
    """MHA (``num_kv_heads == num_heads``), GQA (``num_kv_heads`` dividing ``num_heads``), MQA (1).

    One fused ``qkv_proj`` weight ``[(H + 2G) D, C]``; RoPE on q and k; the cache holds the rotated
    ``k [G, D]`` and ``v [G, D]`` of each token: ``2 G D`` numbers.

    Args:
        hidden_size: C. num_heads: H. head_dim: D. num_kv_heads: G (default H).
        output_gate: multiply the attention output by ``sigmoid(x W_g)`` (an extra projection).
        rope_partial_factor: RoPE rotates only the first ``partial_rotary_dim(D, factor)`` features of q and k.
        head_norm, head_norm_eps: RMSNorm with gain over each head's output before ``o_proj``.
        init_std, out_init_std: normal init std of the projections and of ``o_proj``.

    Shapes: ``forward(x [B, T, C], ctx) -> [B, T, C]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        *,
        output_gate: bool = False,
        rope_partial_factor: float = 1.0,
        head_norm: bool = False,
        head_norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads)
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.hidden_size, self.num_heads, self.head_dim, self.num_kv_heads = hidden_size, num_heads, head_dim, num_kv_heads
        self.rope_dim = partial_rotary_dim(head_dim, rope_partial_factor)
        self.init_head_norm(head_norm, head_dim, head_norm_eps)
        self.output_gate = output_gate
        self.init_std = init_std
        self.out_init_std = init_std if out_init_std is None else out_init_std
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.gate_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False) if output_gate else None
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scaled_normal_(self.qkv_proj.weight, self.init_std)
        if self.gate_proj is not None:
            scaled_normal_(self.gate_proj.weight, self.init_std)
        scaled_normal_(self.o_proj.weight, self.out_init_std)

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.num_kv_heads, self.head_dim), "v": (self.num_kv_heads, self.head_dim)}

    def _use_decode_kernel(self, ctx: AttentionContext, new_tokens: int) -> bool:
        # grouped heads decode through the FlashTPA kernel (tpa.ops.grouped_decode); MHA stays on SDPA
        return grouped_decode_supports(self.num_heads, self.num_kv_heads, self.head_dim) \
            and self.decode_kernel_applies(ctx, new_tokens)

    def _cached_qkv(self, x: torch.Tensor, ctx: AttentionContext):
        """``q [B, T, H, D]`` rotated, the keys and values attention reads (the cache's, after writing the
        new ones, or the new ones), the mask and whether the shapes are fixed (a static step)."""
        bsz, seq, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * d, g * d, g * d], dim=-1)
        q = apply_partial_rotary(q.reshape(bsz, seq, h, d), ctx.cos, ctx.sin)
        k = apply_partial_rotary(k.reshape(bsz, seq, g, d), ctx.cos, ctx.sin)
        v = v.reshape(bsz, seq, g, d)
        if ctx.cache is None:
            return q, k, v, ctx.mask, False
        kv = ctx.cache.update(ctx.step, k=k, v=v)
        return q, kv["k"], kv["v"], ctx.step.mask, ctx.step.fixed_shapes

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        check_hidden(x, self.hidden_size, type(self).__name__)
        bsz, seq, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.fused_step_applies(ctx, seq):  # a static one-token step: RoPE and cache write in one launch
            writes = [(Segment(h * d, g, d, rotate=True), "k"), (Segment((h + g) * d, g, d, rotate=False), "v")]
            q = self.static_step_write(self.qkv_proj(x), ctx, Segment(0, h, d, rotate=True), writes)
            k, v, mask, fixed = ctx.cache.buffer("k"), ctx.cache.buffer("v"), ctx.step.mask, True
        else:
            q, k, v, mask, fixed = self._cached_qkv(x, ctx)
        if self._use_decode_kernel(ctx, seq):
            backend = "triton" if ctx.decode_impl == "kernel" else "auto"
            out = grouped_decode(q, ctx.cache.buffer("k"), ctx.cache.buffer("v"), ctx.step.kernel_seqlens,
                                 backend=backend)
        else:
            out = attend(q, k, v, mask, fixed_shapes=fixed, weights_out=ctx.attention_weights)
        out = self.norm_heads(out)
        if self.gate_proj is not None:
            out = out * torch.sigmoid(self.gate_proj(x).reshape(bsz, seq, h, d))
        return self.o_proj(out.reshape(bsz, seq, h * d))
