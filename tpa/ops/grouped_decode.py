"""Decoding of multi-head, grouped-query and multi-query attention through the FlashTPA kernel.

GQA with G key/value heads is TPA with non-contextual head factors of rank G (paper, Section 4):
``k_h = (1/G) sum_g a[g, h] k_g`` with ``a[g, h] = G`` when query head h reads group g, else 0. The
cached keys and values are then the kernel's feature factors ``b_k``, ``b_v`` as they lie in the
cache (``[B, M, G, D]``), and the head factors are one ``[G, H]`` matrix seen through a stride-0
view: no byte per token is added, and the kernel's split-KV schedule serves all batch sizes (SDPA's
kernels parallelise a one-token step over batch x KV heads only, which leaves most of the GPU idle
at small batches). The query is a rank-H factorisation by the scaled identity.
"""
from __future__ import annotations

import torch

from tpa.ops.decode import DecodeLaunchOptions, tpa_decode

# The query's identity factorisation costs H x H per query head: beyond this many heads the kernel's
# query tile outgrows its registers, and such models decode through SDPA.
MAX_HEADS = 64
MAX_GROUPS = 8

_FACTORS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

# The head factors by plain loads: a_dot (staging them in shared memory) was measured on TPA caches only
# (BENCHMARKS.md, 2026-12-04); the one-hot group factors here are one [G, H] matrix read through a
# stride-0 view, and the GQA/MQA decode figures were measured with plain loads.
_OPTIONS = DecodeLaunchOptions(a_dot=False)


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether :func:`grouped_decode` takes this shape (grouped heads, the kernel's tile limits)."""
    return num_kv_heads < num_heads <= MAX_HEADS and num_kv_heads <= MAX_GROUPS and head_dim <= 256


def _head_factors(heads: int, groups: int, dtype: torch.dtype, device: torch.device):
    """``(a_kv [G, H], a_q [H, H])``: group membership times G, and the identity times H."""
    key = (heads, groups, dtype, device)
    if key in _FACTORS:
        return _FACTORS[key]
    group_of_head = torch.arange(heads, device=device) // (heads // groups)
    a_kv = (group_of_head[None, :] == torch.arange(groups, device=device)[:, None]).to(dtype) * groups
    a_q = torch.eye(heads, dtype=dtype, device=device) * heads
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return a_kv, a_q  # made inside a CUDA-graph capture: the graph's own, not for later eager calls
    _FACTORS[key] = (a_kv, a_q)
    return a_kv, a_q


def grouped_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of N new queries over a grouped K/V cache, by the FlashTPA kernel.

    Args:
        q: ``[B, N, H, D]`` queries (RoPE applied).
        k_cache: ``[B, M, G, D]``, v_cache: ``[B, M, G, E]``, G dividing H (any strides: a model's
            preallocated cache buffers are read in place). M is the capacity.
        cache_seqlens: ``[B]`` int32 valid tokens per sequence, the N new ones included (written
            before the call); query i of sequence b sees slots ``j < cache_seqlens[b] - N + 1 + i``.
        softmax_scale: default ``D ** -0.5``.
        backend: as in :func:`tpa.ops.tpa_decode`.

    Returns:
        ``[B, N, H, E]`` in the dtype of ``q``.
    """
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"grouped_decode expects q [B, N, H, D] and caches [B, M, G, D]; got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    bsz, new, heads, _ = q.shape
    capacity, groups = k_cache.shape[1], k_cache.shape[2]
    if heads % groups or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"grouped_decode: {groups} key/value heads must divide {heads} query heads and the "
                         f"caches must agree; got k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    a_kv, a_q = _head_factors(heads, groups, q.dtype, q.device)
    a_kv = a_kv.to(k_cache.dtype).expand(bsz, capacity, groups, heads)
    return tpa_decode(a_q.expand(bsz, new, heads, heads), q, a_kv, k_cache, a_kv, v_cache, cache_seqlens,
                      softmax_scale=softmax_scale, backend=backend, options=_OPTIONS)
