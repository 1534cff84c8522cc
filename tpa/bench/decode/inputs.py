"""Inputs of the decode benchmark: random TPA factor caches, the SDPA decoding baselines over
materialised K/V caches (MHA, GQA, MQA) and MLA's absorbed decode over its latent cache."""

from __future__ import annotations

import math


def tpa_inputs(torch, bsz, length, h, d, ranks, dtype, n=1, capacity=None, paged_block=None, a_heads=None,
               device="cuda"):
    """Random factors on ``device``; cache_seqlens = length for every sequence. ``a_heads`` (>= h): the
    A caches are views ``buf[..., :h]`` of buffers of that many heads per row (random values there
    too), for :mod:`tpa.bench.decode.variants`'s padded layout."""
    r_q, r_k, r_v = ranks
    hp = a_heads or h
    if hp < h:
        raise ValueError(f"tpa_inputs: a_heads={hp} must be at least h={h}")
    capacity = capacity or length
    a_q = torch.randn(bsz, n, r_q, h, device=device, dtype=dtype)
    b_q = torch.randn(bsz, n, r_q, d, device=device, dtype=dtype)
    if paged_block:
        max_blocks = math.ceil(capacity / paged_block)
        nb = bsz * max_blocks
        lead = (nb, paged_block)
        block_table = torch.randperm(nb, device=device).to(torch.int32).reshape(bsz, max_blocks)
    else:
        lead = (bsz, capacity)
        block_table = None
    dims = ((r_k, hp), (r_k, d), (r_v, hp), (r_v, d))
    caches = [torch.randn(*lead, r, x, device=device, dtype=dtype) for r, x in dims]
    caches[0], caches[2] = caches[0][..., :h], caches[2][..., :h]
    seqlens = torch.full((bsz,), length, dtype=torch.int32, device=device)
    return a_q, b_q, *caches, seqlens, block_table


def tpa_bytes(bsz, length, h, d, ranks, elt, n=1):
    r_q, r_k, r_v = ranks
    cache = bsz * length * (r_k * (h + d) + r_v * (h + d)) * elt
    return cache + bsz * n * r_q * (h + d) * elt + bsz * n * h * d * elt


SDPA_VARIANTS = {
    # name: (backend name, formulation). "rows": the query heads of a KV group become the group's
    # query rows, q [B, H_kv, H/H_kv, d] (exact for one decode query, one K/V read per KV head, as
    # FlashAttention decodes GQA); "gqa": q [B, H, 1, d] with enable_gqa=True.
    "cudnn_rows": ("CUDNN_ATTENTION", "rows"),
    "flash_rows": ("FLASH_ATTENTION", "rows"),
    "efficient_rows": ("EFFICIENT_ATTENTION", "rows"),
    "cudnn_gqa": ("CUDNN_ATTENTION", "gqa"),
    "flash_gqa": ("FLASH_ATTENTION", "gqa"),
    "efficient_gqa": ("EFFICIENT_ATTENTION", "gqa"),
}


def sdpa_decode_fn(torch, bsz, length, h, d, kv_heads, dtype, variant="default_rows"):
    """SDPA decoding of one token over materialised K/V caches [B, H_kv, L, d] (see SDPA_VARIANTS).
    Returns (fn, bytes read and written, tensors)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend, form = SDPA_VARIANTS.get(variant, ("DEFAULT", variant.split("_")[-1]))
    if kv_heads == h:
        form = "rows"
    group = h // kv_heads
    if form == "rows":
        q = torch.randn(bsz, kv_heads, group, d, device="cuda", dtype=dtype)
    else:
        q = torch.randn(bsz, h, 1, d, device="cuda", dtype=dtype)
    k = torch.randn(bsz, kv_heads, length, d, device="cuda", dtype=dtype)
    v = torch.randn(bsz, kv_heads, length, d, device="cuda", dtype=dtype)
    kwargs = {"enable_gqa": True} if form == "gqa" and group > 1 else {}
    if backend == "DEFAULT":
        def fn():
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        backends = [getattr(SDPBackend, backend)]

        def fn():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)

    nbytes = (2 * bsz * kv_heads * length * d + 2 * bsz * h * d) * q.element_size()
    return fn, nbytes, (q, k, v)


def best_sdpa_variant(torch, timer, bsz, length, h, d, kv_heads, dtype):
    """The fastest SDPA variant at one point (a fair, strongest baseline), with all timings."""
    times = {}
    names = ["cudnn_rows", "flash_rows", "efficient_rows"]
    if kv_heads != h:
        names += ["cudnn_gqa", "flash_gqa", "efficient_gqa"]
    for name in names:
        try:
            fn, _, tensors = sdpa_decode_fn(torch, bsz, length, h, d, kv_heads, dtype, name)
            fn()
            torch.cuda.synchronize()
            times[name] = timer.time(fn, reps=10, budget_s=0.1)
            del fn, tensors
        except RuntimeError:
            continue
    return min(times, key=times.get), times


# MLA's latent sizes at d_h = 64 (the presets' kv_lora_rank and qk_rope_head_dim): d_c = 4 d_h, d_R = d_h / 2
MLA_LATENT, MLA_ROPE = 256, 32


def mla_decode_fn(torch, bsz, length, h, dtype, d_c=MLA_LATENT, d_r=MLA_ROPE, device="cuda"):
    """MLA's absorbed one-token decode (:func:`tpa.layers.mla.latent_attention`, what the T6 MLA layer
    runs with a cache) over a latent cache ``c_kv [B, L, d_c]`` and ``k_rope [B, L, d_R]``, H query
    heads. Returns (fn, bytes read and written, tensors)."""
    from tpa.layers.mla import latent_attention

    q_latent = torch.randn(bsz, 1, h, d_c, device=device, dtype=dtype)
    q_rope = torch.randn(bsz, 1, h, d_r, device=device, dtype=dtype)
    c_kv = torch.randn(bsz, length, d_c, device=device, dtype=dtype)
    k_rope = torch.randn(bsz, length, d_r, device=device, dtype=dtype)
    scale = (d_c + d_r) ** -0.5
    nbytes = mla_bytes(bsz, length, h, c_kv.element_size(), d_c, d_r)
    tensors = (q_latent, q_rope, c_kv, k_rope)
    return (lambda: latent_attention(q_latent, q_rope, c_kv, k_rope, None, scale)), nbytes, tensors


def mla_bytes(bsz, length, h, elt, d_c=MLA_LATENT, d_r=MLA_ROPE):
    """Bytes of one absorbed MLA decode call: the latent cache read once, the queries and output."""
    return (bsz * length * (d_c + d_r) + bsz * h * (2 * d_c + d_r)) * elt
