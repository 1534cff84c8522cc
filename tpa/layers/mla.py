"""Multi-head Latent Attention as in DeepSeek-V2 (paper Appendix F.3).

Queries go through a compressed latent ``c_Q = x W_DQ`` (size ``d'_c``, RMS-normalised), keys and
values through ``c_KV = x W_DKV`` (size ``d_c``, RMS-normalised); a decoupled RoPE key
``k_R = RoPE(x W_KR)`` of size ``d_R`` is shared by all heads. Per head:
``q_i = [c_Q W_UQ_i, RoPE(c_Q W_QR_i)]``, ``k_i = [c_KV W_UK_i, k_R]``, ``v_i = c_KV W_UV_i`` (size
``E``, default D), and softmax scale ``(D + d_R) ** -0.5``. The cache holds ``c_KV`` and ``k_R``: ``d_c + d_R`` numbers.

With ``absorb=True`` (the default), calls that use a cache with at most 16 new tokens attend in the latent space: ``W_UK`` is
absorbed into the query and ``W_UV`` applied after attention, so cached latents are never
up-projected (DeepSeek-V2's inference path); :func:`latent_attention` reads the cached ``c_kv``
and ``k_rope`` in place.
"""

from __future__ import annotations

import torch
from torch import nn

from tpa.layers.base import Attention, AttentionContext, attend, check_hidden, check_positive, scaled_normal_
from tpa.modules.norm import RMSNorm
from tpa.modules.rotary import apply_rotary


# torch.bmm(..., out_dtype=torch.float32) on 16-bit CUDA inputs (torch >= 2.8): float32 scores
# straight from the GEMM's accumulator
_BMM_OUT_DTYPE = "out_dtype" in (torch.bmm.__doc__ or "")


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q [B, M, X] @ keys [B, L, X]^T`` as float32 ``[B, M, L]``."""
    if _BMM_OUT_DTYPE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(q, keys.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q, keys.transpose(1, 2)).float()


def latent_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention in MLA's latent space (the absorbed decode), reading the cache in place.

    ``softmax(scale * (q_latent c_kv^T + q_rope k_rope^T)) c_kv``: the latent key of all heads is
    ``[c_kv, k_rope]`` and its value ``c_kv``. The two score parts are two matrix products over the
    cached tensors, so the key is never concatenated (a copy of the whole cache per layer and step)
    and no attention kernel's head-size limit applies (``d_c + d_R`` = 288 in the ``small`` preset,
    beyond SDPA's fused kernels, which fell back to the math backend). Scores and softmax in float32.

    Args:
        q_latent: ``[B, T, H, d_c]`` (``W_UK`` absorbed); q_rope: ``[B, T, H, d_R]`` (rotated).
        c_kv: ``[B, L, d_c]``; k_rope: ``[B, L, d_R]`` (rotated); any strides.
        mask: ``[B, T, L]`` bool (True = may attend), or None for causal attention aligned to the
            end (query i sees keys ``j <= i + L - T``).
        scale: softmax scale.

    Returns:
        ``[B, T, H, d_c]`` in the dtype of ``q_latent``.
    """
    bsz, seq, heads, _ = q_latent.shape
    length = c_kv.shape[1]
    scores = _scores(q_latent.reshape(bsz, seq * heads, -1), c_kv)
    scores += _scores(q_rope.reshape(bsz, seq * heads, -1), k_rope)
    scores = scores.view(bsz, seq, heads, length)
    if mask is None and seq > 1:
        idx = torch.arange(length, device=c_kv.device)
        mask = (idx[None, :] <= idx[-seq:, None])[None]
    scores *= scale
    if mask is not None:
        scores = torch.where(mask[:, :, None, :], scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(c_kv.dtype)
    return torch.bmm(probs.view(bsz, seq * heads, length), c_kv).view(bsz, seq, heads, -1)


class MultiHeadLatentAttention(Attention):
    """MLA layer.

    Args:
        hidden_size: C. num_heads: H. head_dim: D (the non-RoPE query/key part).
        value_dim: E, the value head size (default D).
        kv_lora_rank: d_c. q_lora_rank: d'_c (0 for an uncompressed query). qk_rope_head_dim: d_R.
        latent_norm: RMSNorm on ``c_Q`` and ``c_KV`` as in DeepSeek-V2 (epsilon ``eps``).
        absorb: attend in the latent space when a cache is used.
        head_norm, head_norm_eps: RMSNorm with gain over each head's output before ``o_proj``.

    Shapes: ``forward(x [B, T, C], ctx) -> [B, T, C]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        kv_lora_rank: int,
        q_lora_rank: int,
        qk_rope_head_dim: int = 32,
        *,
        latent_norm: bool = True,
        absorb: bool = True,
        value_dim: int | None = None,
        head_norm: bool = False,
        head_norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        value_dim = head_dim if value_dim is None else value_dim
        check_positive(
            hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, value_dim=value_dim,
            kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
        )
        if not isinstance(q_lora_rank, int) or q_lora_rank < 0:
            raise ValueError(f"q_lora_rank must be an integer >= 0 (0: no query compression), got {q_lora_rank!r}")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        self.hidden_size, self.num_heads, self.head_dim, self.value_dim = hidden_size, num_heads, head_dim, value_dim
        self.kv_lora_rank, self.q_lora_rank, self.rope_dim = kv_lora_rank, q_lora_rank, qk_rope_head_dim
        self.absorb = absorb
        # latent-space attention pays off for a few new tokens against a long cache (decoding); a long
        # prefill is cheaper with up-projected keys and values (and can use flash attention)
        self.absorb_max_tokens = 16
        self.init_std = init_std
        self.out_init_std = init_std if out_init_std is None else out_init_std
        self.scale = (head_dim + qk_rope_head_dim) ** -0.5
        q_out = num_heads * (head_dim + qk_rope_head_dim)  # W_UQ and W_QR side by side
        if q_lora_rank:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(q_lora_rank, eps) if latent_norm else nn.Identity()
            self.q_b_proj = nn.Linear(q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=False)
        self.kv_a_proj = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)  # W_DKV, W_KR
        self.kv_a_norm = RMSNorm(kv_lora_rank, eps) if latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (head_dim + value_dim), bias=False)  # W_UK, W_UV per head
        self.o_proj = nn.Linear(num_heads * value_dim, hidden_size, bias=False)
        self.init_head_norm(head_norm, value_dim, head_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.o_proj:
                scaled_normal_(module.weight, self.init_std)
        scaled_normal_(self.o_proj.weight, self.out_init_std)

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"c_kv": (self.kv_lora_rank,), "k_rope": (self.rope_dim,)}

    def _queries(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seq, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.reshape(bsz, seq, self.num_heads, self.head_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.head_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, cos, sin)

    def _up_weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, D, d_c]``, ``W_UV [H, E, d_c]`` (``like``: a tensor of the activations' dtype and device).

        A plain ``nn.Linear`` gives its weight (under tensor parallelism, this rank's heads of it). A
        replaced ``kv_b_proj`` (a LoRA adapter, an 8-bit or int8 layer of a quantized model) is read as
        the map it computes, ``kv_b_proj(I)^T``, so the absorbed path sees exactly what the unabsorbed
        one applies.
        """
        proj = self.kv_b_proj
        if type(proj) is nn.Linear and type(proj.weight) is nn.Parameter:
            w = proj.weight
        elif type(proj) is nn.Linear and hasattr(proj.weight, "to_local"):  # a DTensor: tpa.parallel
            w = proj.weight.to_local()
        else:
            eye = torch.eye(self.kv_lora_rank, device=like.device, dtype=like.dtype)
            w = proj(eye).transpose(0, 1)
        w = w.reshape(self.num_heads, self.head_dim + self.value_dim, self.kv_lora_rank)
        return w[:, : self.head_dim], w[:, self.head_dim :]

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        check_hidden(x, self.hidden_size, type(self).__name__)
        bsz, seq, _ = x.shape
        h, d, e = self.num_heads, self.head_dim, self.value_dim
        q_nope, q_rope = self._queries(x, ctx.cos, ctx.sin)
        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_norm(c_kv), apply_rotary(k_rope, ctx.cos, ctx.sin)
        k_rope = self.shared_for_heads(k_rope)
        mask = ctx.mask
        if ctx.cache is not None:
            kv = ctx.cache.update(ctx.step, c_kv=c_kv, k_rope=k_rope)
            c_kv, k_rope, mask = kv["c_kv"], kv["k_rope"], ctx.step.mask
        length = c_kv.shape[1]
        if ctx.cache is not None and self.absorb and seq <= self.absorb_max_tokens:
            w_uk, w_uv = self._up_weights(c_kv)
            q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
            latent = self.shared_for_heads(c_kv)  # goes to this rank's heads directly (its gradient under TP)
            if ctx.attention_weights is None:
                out_latent = latent_attention(q_latent, q_rope, latent, k_rope, mask, self.scale)  # [B, T, H, d_c]
            else:  # the same attention with its weights written out: one latent "head" shared by all heads
                query = torch.cat([q_latent, q_rope], dim=-1)  # [B, T, H, d_c + d_R]
                key = torch.cat([latent, k_rope], dim=-1)[:, :, None]
                out_latent = attend(query, key, latent[:, :, None], mask, scale=self.scale,
                                    weights_out=ctx.attention_weights)
            out = torch.einsum("bthc,hdc->bthd", out_latent, w_uv)
        else:
            k_nope, v = self.kv_b_proj(c_kv).reshape(bsz, length, h, d + e).split([d, e], dim=-1)
            k = torch.cat([k_nope, k_rope[:, :, None].expand(bsz, length, h, self.rope_dim)], dim=-1)
            q = torch.cat([q_nope, q_rope], dim=-1)
            out = attend(q, k, v, mask, scale=self.scale, weights_out=ctx.attention_weights)
        return self.o_proj(self.norm_heads(out).reshape(bsz, seq, h * e))
