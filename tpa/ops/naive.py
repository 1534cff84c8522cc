"""Reference twins: plain einsum implementations of TPA attention, the ground truth for every kernel.

Shapes (the paper's Appendix A/B notation, token-major layout):

- ``a_q [B, N, R_q, H]``, ``b_q [B, N, R_q, D]``: query factors of N query tokens;
- ``a_k [B, M, R_k, H]``, ``b_k [B, M, R_k, D]``: key factors (``b_k`` already RoPE-rotated);
- ``a_v [B, M, R_v, H]``, ``b_v [B, M, R_v, E]``: value factors;
- output ``[B, N, H, E]``.

The rank normalisations s_Q = 1/R_q, s_K = 1/R_k, s_V = 1/R_v of eq. (3.1) are applied here,
so callers pass the raw factors. ``softmax_scale`` defaults to ``D ** -0.5``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "materialize",
    "tpa_attention_factors",
    "tpa_decode_reference",
    "gather_paged",
]


def materialize(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Form Q (or K, V) from its factors: ``(1/R) A^T B`` per token.

    Args:
        a: ``[B, T, R, H]`` head factors.
        b: ``[B, T, R, D]`` feature factors.
        scale: multiplies the sum over ranks instead of the default ``1/R``.

    Returns:
        ``[B, T, H, D]``.
    """
    out = torch.einsum("btrh,btrd->bthd", a, b)
    return out / a.shape[-2] if scale is None else out * scale


def tpa_attention_factors(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_k: torch.Tensor,
    b_k: torch.Tensor,
    a_v: torch.Tensor,
    b_v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Algorithm 1: attention computed from the factors without materialising Q, K or V.

    Args:
        a_q, b_q, a_k, b_k, a_v, b_v: factors as in the module docstring (N = T_q, M = T_k).
        mask: optional boolean ``[B, T_q, T_k]`` (True = may attend). When given, ``causal`` is ignored.
        causal: causal mask aligned to the end (query i sees keys ``j <= i + T_k - T_q``).
        softmax_scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, T_q, H, E]`` in the dtype of ``b_v``.
    """
    r_q, r_k, r_v = a_q.shape[-2], a_k.shape[-2], a_v.shape[-2]
    d = b_q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    t_q, t_k = a_q.shape[1], a_k.shape[1]
    # (1) head-shared feature dot products P[b, q, k, r, s]
    p = torch.einsum("bqrd,bksd->bqkrs", b_q, b_k)
    # (2) per-head rank mixing to logits
    logits = torch.einsum("bqrh,bksh,bqkrs->bhqk", a_q, a_k, p) * (scale / (r_q * r_k))
    if mask is None and causal:
        q_idx = torch.arange(t_q, device=a_q.device)[:, None] + (t_k - t_q)
        k_idx = torch.arange(t_k, device=a_q.device)[None, :]
        mask = (k_idx <= q_idx).unsqueeze(0)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
    work = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(work), dim=-1).to(b_v.dtype)
    out = torch.einsum("bhqk,bkuh,bkue->bqhe", probs, a_v, b_v) / r_v
    return out


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Turn a paged cache into a contiguous one.

    Args:
        cache: ``[num_blocks, block_size, R, X]``.
        block_table: ``[B, max_blocks]`` int32 block indices.

    Returns:
        ``[B, max_blocks * block_size, R, X]``.
    """
    blocks = cache[block_table.long()]  # [B, max_blocks, block_size, R, X]
    bsz, nblk, blk = blocks.shape[:3]
    return blocks.reshape(bsz, nblk * blk, *cache.shape[2:])


def tpa_decode_reference(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_k_cache: torch.Tensor,
    b_k_cache: torch.Tensor,
    a_v_cache: torch.Tensor,
    b_v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """Algorithm 2 (FlashTPA decoding) written plainly, computed in float32.

    The N query tokens of sequence b are the last N of its ``cache_seqlens[b]`` cached tokens:
    query i sees cache entries ``j < cache_seqlens[b] - N + 1 + i`` (causal, aligned to the end).

    Args:
        a_q: ``[B, N, R_q, H]``; b_q: ``[B, N, R_q, D]``.
        a_k_cache: ``[B, M, R_k, H]``, or ``[num_blocks, block_size, R_k, H]`` with ``block_table``.
        b_k_cache: ``[B, M, R_k, D]`` (RoPE already applied), or paged likewise.
        a_v_cache: ``[B, M, R_v, H]``; b_v_cache: ``[B, M, R_v, E]``, or paged likewise.
        cache_seqlens: ``[B]`` int32, valid cached tokens per sequence (the N new ones included).
        block_table: optional ``[B, max_blocks]`` int32 for a paged cache.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled logits, ``[B, N, H]`` float32.

    Returns:
        ``out [B, N, H, E]`` in the dtype of ``b_q`` (and ``lse`` when asked).
    """
    if block_table is not None:
        a_k_cache, b_k_cache, a_v_cache, b_v_cache = (
            gather_paged(c, block_table) for c in (a_k_cache, b_k_cache, a_v_cache, b_v_cache)
        )
    f32 = torch.float32
    aq, bq = a_q.to(f32), b_q.to(f32)
    ak, bk, av, bv = (c.to(f32) for c in (a_k_cache, b_k_cache, a_v_cache, b_v_cache))
    r_q, r_k, r_v = aq.shape[-2], ak.shape[-2], av.shape[-2]
    n, m = aq.shape[1], ak.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(bq.shape[-1])
    p = torch.einsum("bnrd,bmsd->bnmrs", bq, bk)
    logits = torch.einsum("bnrh,bmsh,bnmrs->bhnm", aq, ak, p) * (scale / (r_q * r_k))
    seqlens = cache_seqlens.to(device=aq.device, dtype=torch.long)
    limit = seqlens[:, None] - n + 1 + torch.arange(n, device=aq.device)[None, :]  # [B, N]
    visible = torch.arange(m, device=aq.device)[None, None, :] < limit[:, :, None]  # [B, N, M]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, N]
    probs = torch.exp(logits - lse[..., None])
    out = torch.einsum("bhnm,bmuh,bmue->bnhe", probs, av, bv) / r_v
    out = out.to(b_q.dtype)
    if return_lse:
        return out, lse.transpose(1, 2).contiguous()
    return out
