"""What every attention layer shares: the call context, the SDPA call and input checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tpa.cache import CacheStep, KVCache, LayerCache, elements_per_token
from tpa.modules.norm import RMSNorm
from tpa.modules.rotary import apply_partial_rotary, apply_rotary  # noqa: F401  # re-exported for the layers
from tpa.ops.step_write import Segment, step_write


# With a cache the key length changes at every call; cuDNN attention builds a new plan per shape
# (milliseconds of host time per call), so cached calls use the other backends.
_CACHE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionContext:
    """Everything a layer needs besides the hidden states; built once per model forward.

    Attributes:
        cos, sin: ``[B, T, d_rope/2]`` RoPE tables for the positions of the T new tokens.
        mask: ``[B, T, L]`` bool (True = may attend) or None for plain causal attention over the
            T new tokens (no cache, no padding).
        cache: this layer's cache, or None.
        step: the cache bookkeeping of this call (with ``cache``).
        kv_cache, rotary: no longer read where ``step`` carries the key slots' RoPE tables
            (``step.key_cos/key_sin``, which the model sets); a context built without them still
            works: the layer then takes the key positions from ``kv_cache`` and rotates with ``rotary``.
        decode_impl: ``"auto"`` (FlashTPA kernel on CUDA where it applies), ``"kernel"`` or ``"reference"``.
        attention_weights: a list to append this layer's softmax weights ``[B, H, T, L]`` to
            (``output_attentions=True``); the layer then attends through :func:`attend_explicit`.
        fused_step: the block runs the one-token step's fused launches: each sublayer's output added to
            the residual stream in the next norm's launch (:meth:`tpa.modules.RMSNorm.add_and_norm`) and
            SwiGLU's activation in one (:func:`tpa.ops.swiglu.silu_mul`). The model sets it for static
            one-token steps on the kernel path, whose host time a CUDA graph replay hides.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    cache: LayerCache | None = None
    step: CacheStep | None = None
    kv_cache: KVCache | None = None
    rotary: nn.Module | None = None
    decode_impl: str = "auto"
    attention_weights: list[torch.Tensor] | None = None
    fused_step: bool = False


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_hidden(x: torch.Tensor, hidden_size: int, layer: str) -> None:
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"{layer} expects hidden states of shape [batch, seq, {hidden_size}], got {tuple(x.shape)}")


def attend_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` with the softmax weights written out (``output_attentions=True``).

    Same arguments as :func:`attend`. Returns ``(out [B, T, H, E], weights [B, H, T, L])``; the
    weights are those of every query head (grouped keys are shared by their query heads).
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    t_q, t_k = qh.shape[2], kh.shape[2]
    if mask is None:
        idx = torch.arange(t_k, device=q.device)
        mask = (idx[None, :] <= idx[:t_q, None] + (t_k - t_q))[None]
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale
    weights = scores.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1)
    out = torch.matmul(weights, vh.float()).to(v.dtype)
    return out.transpose(1, 2), weights.to(q.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    fixed_shapes: bool = False,
    weights_out: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention in the ``[B, T, H, D]`` layout.

    Args:
        q: ``[B, T, H, D]``; k: ``[B, L, G, D]``; v: ``[B, L, G, E]`` with ``G`` dividing ``H``
            (key/value heads are shared by groups of ``H/G`` query heads).
        mask: ``[B, T, L]`` bool, or None for causal attention aligned to the end (query i sees
            keys ``j <= i + L - T``; flash attention when ``T == L`` or ``T == 1``).
        scale: softmax scale, default ``D ** -0.5``.
        fixed_shapes: the call's shapes repeat from call to call (a static cache's one-token step):
            SDPA picks its backend as for any call (cuDNN included, as transformers' Llama gets
            it). Otherwise cached calls exclude cuDNN attention, which builds a plan per new shape.
        weights_out: a list to append the softmax weights ``[B, H, T, L]`` to; the attention then
            runs through :func:`attend_explicit` (no fused kernel writes the weights out).

    Returns:
        ``[B, T, H, E]``.
    """
    if weights_out is not None:
        out, weights = attend_explicit(q, k, v, mask, scale)
        weights_out.append(weights)
        return out
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kh.shape[1] != qh.shape[1]
    t_q, t_k = qh.shape[2], kh.shape[2]
    if mask is None and t_q == t_k:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif mask is None and t_q == 1:
        with sdpa_kernel(_CACHE_BACKENDS):
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=gqa)
    elif t_q == 1:
        # One query over a masked cache (static decoding over the whole capacity, padded steps): the
        # H/G query heads of each K/V group become the query axis of one head, so grouped K/V are
        # read in place, never expanded, and the mask [B, 1, 1, L] broadcasts over heads and queries.
        bsz, heads, groups = qh.shape[0], qh.shape[1], kh.shape[1]
        qg = qh.reshape(bsz, groups, heads // groups, qh.shape[-1])  # query head h = g * (H/G) + j
        if fixed_shapes:
            out = F.scaled_dot_product_attention(qg, kh, vh, attn_mask=mask[:, None], scale=scale)
        else:
            with sdpa_kernel(_CACHE_BACKENDS):
                out = F.scaled_dot_product_attention(qg, kh, vh, attn_mask=mask[:, None], scale=scale)
        out = out.reshape(bsz, heads, 1, vh.shape[-1])
    else:
        if mask is None:
            idx = torch.arange(t_k, device=q.device)
            mask = (idx[None, :] <= idx[:t_q, None] + (t_k - t_q))[None]
        if gqa:  # the memory-efficient kernel (the one taking masks) has no grouped heads: share by expanding
            group = qh.shape[1] // kh.shape[1]
            kh, vh, gqa = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1), False
        with sdpa_kernel(_CACHE_BACKENDS):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def scaled_normal_(weight: torch.Tensor, std: float) -> None:
    """``normal(0, std)`` init that leaves weights alone when a loader marked them as loaded."""
    if not getattr(weight, "_is_hf_initialized", False):
        nn.init.normal_(weight, mean=0.0, std=std)


def partial_rotary_dim(feature_dim: int, factor: float) -> int:
    """How many leading features of a ``feature_dim`` vector RoPE rotates: ``int(feature_dim * factor)``
    rounded down to an even number (the paper's code's partial-RoPE rule); ``factor=1`` rotates all."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise ValueError(f"rope_partial_factor must be a number in (0, 1], got {factor!r}")
    dim = int(feature_dim * factor) // 2 * 2
    if dim < 2:
        raise ValueError(f"rope_partial_factor={factor} rotates {dim} of {feature_dim} features; RoPE needs at least 2")
    return dim


class Attention(nn.Module):
    """Base class: ``forward(hidden_states [B, T, C], ctx) -> [B, T, C]`` and a cache spec.

    A layer may norm each head's output before the output projection (the paper's code's
    ``using_groupnorm``): :meth:`init_head_norm` in ``__init__``, :meth:`norm_heads` in ``forward``.
    """

    hidden_size: int
    # True where the layer rotates cached keys as it reads them (it caches them unrotated): the model
    # then puts the key slots' RoPE tables on the cache step (``CacheStep.key_cos/key_sin``).
    rotates_cached_keys: bool = False

    def init_head_norm(self, enabled: bool, value_dim: int, eps: float) -> None:
        """An RMSNorm with gain over each head's ``value_dim`` output features (one gain shared by all heads)."""
        self.head_norm = RMSNorm(value_dim, eps) if enabled else None

    def norm_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``out [B, T, H, E]`` normed per head when the layer has a head norm, else unchanged."""
        head_norm = getattr(self, "head_norm", None)
        return out if head_norm is None else head_norm(out)

    def shared_for_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, which every rank computes alike, about to enter this rank's own heads: the identity here;
        under tensor parallelism (:mod:`tpa.parallel`) its gradient is summed over the ranks."""
        return x

    # the FlashTPA decode kernel serves decoding, speculative and small chunked steps; a long prefill goes to SDPA
    decode_kernel_max_tokens = 16

    def decode_kernel_applies(self, ctx: AttentionContext, new_tokens: int) -> bool:
        """Whether a cached step of ``new_tokens`` may run through the FlashTPA decode kernel: a cache
        with run-time lengths (``kernel_seqlens``), no attention weights asked for, and the kernel
        chosen by ``ctx.decode_impl`` (``"auto"``: on CUDA). Layers add their own shape conditions."""
        if new_tokens > self.decode_kernel_max_tokens or ctx.cache is None or ctx.step is None \
                or ctx.decode_impl == "reference" or ctx.attention_weights is not None:
            return False
        if ctx.decode_impl == "auto" and ctx.cos.device.type != "cuda":
            return False
        return ctx.step.kernel_seqlens is not None

    def fused_step_applies(self, ctx: AttentionContext, new_tokens: int) -> bool:
        """Whether this call is a static cache's one-token step on the kernel path, whose RoPE and cache
        write go through :meth:`static_step_write` (one launch instead of about twenty small kernels)."""
        return (new_tokens == 1 and ctx.step is not None and ctx.step.fixed_shapes
                and Attention.decode_kernel_applies(self, ctx, new_tokens))

    @staticmethod
    def static_step_write(projected: torch.Tensor, ctx: AttentionContext, query: Segment, writes) -> torch.Tensor:
        """:func:`tpa.ops.step_write.step_write` of the step's projection ``[B, 1, P]``: writes each
        ``(segment, cache name)`` of ``writes`` into this layer's cache, returns the query part ``[B, 1, rows, width]``."""
        bsz = projected.shape[0]
        caches = [(seg, ctx.cache.buffer(name)) for seg, name in writes]
        backend = "triton" if ctx.decode_impl == "kernel" else "auto"
        rotated = step_write(projected.reshape(bsz, -1), ctx.cos.reshape(bsz, -1), ctx.sin.reshape(bsz, -1),
                             ctx.step.slots.reshape(bsz), query, caches, backend=backend)
        return rotated[:, None]

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        """Per-token shapes of the tensors this layer caches."""
        raise NotImplementedError

    def cache_storage(self) -> dict[str, tuple[int, ...]]:
        """Per-token shapes of the buffers that hold :meth:`cache_spec`'s tensors, each dimension at
        least the spec's (padding the decode kernel may read); by default the spec itself."""
        return self.cache_spec()

    def kv_cache_elements_per_token(self) -> int:
        return elements_per_token(self.cache_spec())
