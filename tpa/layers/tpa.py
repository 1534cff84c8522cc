"""Tensor Product Attention (paper Section 3) and all its variants as configuration values.

For token t, with factors from linear maps of ``x_t`` (eq. 3.1):

    Q_t = (1/R_q) A_q(x_t)^T B_q(x_t),   K_t = (1/R_k) A_k^T B_k,   V_t = (1/R_v) A_v^T B_v,

``A [R, H]`` (head factors), ``B [R, D]`` (feature factors). RoPE rotates the B factors of Q and K
(eq. 3.5); the cache holds ``A_k``, rotated ``B_k``, ``A_v``, ``B_v``: ``(R_k + R_v)(H + D)`` numbers.

Variants (Appendix C and G):

- ``factorize_q=False``: TPA-KVonly, a standard query projection.
- ``contextual_a=False`` / ``contextual_b=False``: head (resp. feature) factors are learned
  parameters independent of the token; only the contextual factors are cached.
- ``share_kv_b=True``: K and V share their (pre-RoPE) feature factor. The cache stores that factor
  once, unrotated, and keys are rotated when read (the price of the smaller cache).
- ``head_activation``: ``"none"``, ``"sigmoid"`` or ``"softmax"`` (over heads) on the A factors.
- ``order=3``: third-order TPA, ``Q_t = (1/R) sum_r a_r (x) vec(b_r (x) c_r)`` with ``b_r`` of size
  ``D / c_dim`` and ``c_r`` of size ``c_dim``; RoPE rotates ``b_r`` only (Theorem C.1).
- ``output_gate=True``: the attention output is multiplied by ``sigmoid(x W_g)`` per head and feature.

All token-dependent projections (factors, the KVonly query, the gate) come from one fused weight
``proj``. Attention runs by materialising Q, K, V and calling SDPA (``attn_impl="sdpa"``) or from the
factors without materialising Q and K (``attn_impl="factors"``, Algorithm 1). Cached decoding steps
of the plain layout (second order, contextual factors, no shared B) may run the FlashTPA decode kernel
(:func:`tpa.ops.decode.tpa_decode`); ``cache_head_multiple`` pads the cached head factors' rows for it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tpa.layers.base import (Attention, AttentionContext, apply_partial_rotary, attend, check_hidden, check_positive,
                             partial_rotary_dim, scaled_normal_)
from tpa.ops.decode import DecodeLaunchOptions, tpa_decode
from tpa.ops.fused_materialize import tpa_materialize_many
from tpa.ops.naive import tpa_attention_factors
from tpa.ops.step_write import Segment

HEAD_ACTIVATIONS = ("none", "sigmoid", "softmax")
ATTN_IMPLS = ("sdpa", "factors")


def decode_kernel_blockers(order: int, contextual_a: bool, contextual_b: bool, share_kv_b: bool,
                           attn_impl: str) -> list[str]:
    """The settings that keep the FlashTPA decode kernel off (it reads the plain factor cache):
    empty for the layouts it decodes."""
    blockers = [] if order == 2 else [f"order={order}"]
    blockers += [] if contextual_a else ["contextual_a=False"]
    blockers += [] if contextual_b else ["contextual_b=False"]
    blockers += ["share_kv_b=True"] if share_kv_b else []
    return blockers + ([] if attn_impl == "sdpa" else [f"attn_impl={attn_impl!r}"])


def check_cache_head_multiple(multiple, blockers: list[str]) -> None:
    """Raise ValueError unless ``multiple`` is an int >= 1, and 1 where ``blockers``
    (:func:`decode_kernel_blockers`) keep the decode kernel, the padding's only reader, off."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"cache_head_multiple (tpa_cache_head_multiple) must be an int >= 1, got {multiple!r}")
    if multiple > 1 and blockers:
        raise ValueError(f"cache_head_multiple={multiple} pads the head factors for the FlashTPA decode kernel, "
                         f"which {', '.join(blockers)} keeps off: leave it at 1")


def expand_third_order(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``vec(b (x) c)``: ``b [..., d_b]``, ``c [..., d_c]`` -> ``[..., d_c * d_b]``, entry ``j*d_b + i = c_j b_i``.

    (``vec`` stacks the columns of the ``d_b x d_c`` matrix ``b c^T``, as in the paper's Section 2.)
    """
    return (c[..., :, None] * b[..., None, :]).flatten(-2)


class TensorProductAttention(Attention):
    """TPA layer.

    Args:
        hidden_size: model width C.
        num_heads: H (any positive integer).
        head_dim: D, the query/key feature size.
        q_rank, k_rank, v_rank: R_q, R_k, R_v (each >= 1; ``q_rank`` unused when ``factorize_q=False``).
        value_dim: E, the value feature size (default D).
        factorize_q, contextual_a, contextual_b, share_kv_b, head_activation, order, c_dim,
        output_gate, attn_impl: see the module docstring.
        rope_partial_factor: RoPE rotates only the first ``partial_rotary_dim(D, factor)`` features of
            each ``b_q``/``b_k`` (and KVonly query) vector (second order only).
        head_norm, head_norm_eps: RMSNorm with gain over each head's output before ``o_proj``.
        init_std: std of the normal init of non-factor projections (KVonly query, gate).
        out_init_std: std of the output projection init (default ``init_std``).
        cache_head_multiple: M; the cached ``a_k``/``a_v`` rows are stored padded to ``ceil(H/M)*M``
            heads (zeros) and the decode kernel's loads read them whole (``DecodeLaunchOptions(
            a_head_pad=M, a_dot=False)``: plain loads, the path this layout was measured with); readers
            still get ``[R, H]``. 1 (default): unpadded. Plain layout only.

    Shapes: ``forward(x [B, T, C], ctx) -> [B, T, C]``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        q_rank: int = 6,
        k_rank: int = 2,
        v_rank: int = 2,
        *,
        value_dim: int | None = None,
        factorize_q: bool = True,
        contextual_a: bool = True,
        contextual_b: bool = True,
        share_kv_b: bool = False,
        head_activation: str = "none",
        order: int = 2,
        c_dim: int = 1,
        output_gate: bool = False,
        attn_impl: str = "sdpa",
        rope_partial_factor: float = 1.0,
        head_norm: bool = False,
        head_norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        cache_head_multiple: int = 1,
    ):
        super().__init__()
        value_dim = head_dim if value_dim is None else value_dim
        check_positive(
            hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim, q_rank=q_rank,
            k_rank=k_rank, v_rank=v_rank, value_dim=value_dim, c_dim=c_dim,
        )
        if head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"head_activation must be one of {HEAD_ACTIVATIONS}, got {head_activation!r}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if order not in (2, 3):
            raise ValueError(f"order must be 2 (TPA) or 3 (third-order TPA), got {order!r}")
        if not contextual_a and not contextual_b:
            raise ValueError("at least one of contextual_a and contextual_b must be True")
        if order == 3:
            if value_dim != head_dim:
                raise ValueError("third-order TPA needs value_dim == head_dim")
            if head_dim % c_dim:
                raise ValueError(f"third-order TPA needs c_dim dividing head_dim={head_dim}, got c_dim={c_dim}")
        elif c_dim != 1:
            raise ValueError("c_dim is only used by third-order TPA (order=3)")
        if share_kv_b and (k_rank != v_rank or value_dim != head_dim or order != 2):
            raise ValueError("share_kv_b needs k_rank == v_rank, value_dim == head_dim and order == 2")
        self.hidden_size, self.num_heads, self.head_dim, self.value_dim = hidden_size, num_heads, head_dim, value_dim
        self.q_rank, self.k_rank, self.v_rank = q_rank, k_rank, v_rank
        self.factorize_q, self.contextual_a, self.contextual_b = factorize_q, contextual_a, contextual_b
        self.share_kv_b, self.head_activation, self.order, self.c_dim = share_kv_b, head_activation, order, c_dim
        self.rotates_cached_keys = share_kv_b or not contextual_b  # their key factor is cached unrotated
        self.output_gate, self.attn_impl = output_gate, attn_impl
        self.init_std = init_std
        blockers = decode_kernel_blockers(order, contextual_a, contextual_b, share_kv_b, attn_impl)
        check_cache_head_multiple(cache_head_multiple, blockers)
        self.kernel_layout = not blockers  # the FlashTPA decode kernel reads this layer's cache
        self.cache_head_multiple = cache_head_multiple
        # built once: the decode op keys its launch plans by the options' identity
        # (padded rows by plain loads, as measured: the default one-hot path, a_dot, reads H heads per row)
        self.decode_options = (DecodeLaunchOptions(a_head_pad=cache_head_multiple, a_dot=False)
                               if cache_head_multiple > 1 else None)
        self.out_init_std = init_std if out_init_std is None else out_init_std
        self.b_dim = head_dim // c_dim  # feature size of the b factors (D, or d_b for third order)
        if self.b_dim % 2:
            raise ValueError(f"RoPE rotates the b factors, whose size must be even; got {self.b_dim}")
        if order == 3 and rope_partial_factor != 1:
            raise ValueError("rope_partial_factor is only implemented for second-order TPA (order=2)")
        self.rope_dim = partial_rotary_dim(self.b_dim, rope_partial_factor)
        self.init_head_norm(head_norm, value_dim, head_norm_eps)
        self._build_projections()
        self.reset_parameters()

    def _build_projections(self) -> None:
        """The factors' shapes (``factor_shapes``: name -> (rank, width)), split into the token-dependent
        segments of the one input projection ``proj`` (``segments``: name, size) and the parameters of
        the non-contextual factors; and the output projection ``o_proj``."""
        q_rank, k_rank, v_rank, factorize_q = self.q_rank, self.k_rank, self.v_rank, self.factorize_q
        num_heads, head_dim, value_dim, order = self.num_heads, self.head_dim, self.value_dim, self.order
        share_kv_b, c_dim = self.share_kv_b, self.c_dim
        factors: dict[str, tuple[int, int]] = {}
        for kind, rank in (("q", q_rank), ("k", k_rank), ("v", v_rank)):
            if kind == "q" and not factorize_q:
                continue
            factors[f"a_{kind}"] = (rank, num_heads)
            if kind == "v" and share_kv_b:
                continue
            factors[f"b_{kind}"] = (rank, self.b_dim if order == 3 else (value_dim if kind == "v" else head_dim))
            if order == 3:
                factors[f"c_{kind}"] = (rank, c_dim)
        self.factor_shapes = factors
        self.segments: list[tuple[str, int]] = []
        if not factorize_q:
            self.segments.append(("q", num_heads * head_dim))
        for name, (rank, width) in factors.items():
            if self._is_contextual(name):
                self.segments.append((name, rank * width))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(rank, width)))
        if self.output_gate:
            self.segments.append(("gate", num_heads * value_dim))
        self.proj = nn.Linear(self.hidden_size, sum(size for _, size in self.segments), bias=False)
        self.o_proj = nn.Linear(num_heads * value_dim, self.hidden_size, bias=False)

    def _is_contextual(self, name: str) -> bool:
        return self.contextual_a if name.startswith("a_") else self.contextual_b

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform factor weights (Appendix G), one bound per factor matrix ``[R*width, C]``;
        normal(0, init_std) for the KVonly query and the gate; normal(0, out_init_std) for ``o_proj``."""
        weight = self.proj.weight
        if not getattr(weight, "_is_hf_initialized", False):
            fresh = torch.empty_like(weight)
            for (name, size), block in zip(self.segments, fresh.split([s for _, s in self.segments], dim=0)):
                if name in self.factor_shapes:
                    bound = math.sqrt(6.0 / (self.hidden_size + size))
                    block.uniform_(-bound, bound)
                else:
                    block.normal_(0.0, self.init_std)
            weight.copy_(fresh)
        for name in self.factor_shapes:
            param = getattr(self, name, None)
            if isinstance(param, nn.Parameter) and not getattr(param, "_is_hf_initialized", False):
                nn.init.xavier_uniform_(param)
        scaled_normal_(self.o_proj.weight, self.out_init_std)

    # ------------------------------------------------------------------ factors

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        spec = {}
        for name in ("a_k", "b_k", "c_k", "a_v", "b_v", "c_v"):
            if name in self.factor_shapes and self._is_contextual(name):
                spec[name] = self.factor_shapes[name]
        if self.share_kv_b and self.contextual_b:
            spec["b_kv"] = spec.pop("b_k")
        return spec

    def cache_storage(self) -> dict[str, tuple[int, ...]]:
        """:meth:`cache_spec` with ``a_k``/``a_v`` as ``(R, ceil(H/M)*M)`` for ``M = cache_head_multiple``."""
        spec, multiple = self.cache_spec(), self.cache_head_multiple
        if multiple > 1:
            for name in ("a_k", "a_v"):
                rank, heads = spec[name]
                spec[name] = (rank, -(-heads // multiple) * multiple)
        return spec

    def _activate(self, a: torch.Tensor) -> torch.Tensor:
        if self.head_activation == "sigmoid":
            return torch.sigmoid(a)
        if self.head_activation == "softmax":
            return torch.softmax(a.to(torch.promote_types(a.dtype, torch.float32)), dim=-1).to(a.dtype)
        return a

    def _factor(self, parts: dict[str, torch.Tensor], name: str, batch: int, length: int) -> torch.Tensor:
        rank, width = self.factor_shapes[name]
        if name in parts:
            value = parts[name].reshape(batch, length, rank, width)
        else:
            value = getattr(self, name).expand(batch, length, rank, width)
        return self._activate(value) if name.startswith("a_") else value

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``[B, T, R, D]`` feature vectors; for third order, each ``d_b`` block (``T_t = I (x) R_t``)."""
        if self.order == 2:
            return apply_partial_rotary(x, cos, sin)
        blocks = x.unflatten(-1, (x.shape[-1] // self.rope_dim, self.rope_dim))
        return apply_partial_rotary(blocks, cos, sin).flatten(-2)

    def _features(self, b: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return b if c is None else expand_third_order(b, c)

    def factors(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token factors of the new tokens, with RoPE applied to ``b_q`` and ``b_k``.

        Returns a dict with ``a_q [B,T,R_q,H]`` and ``b_q [B,T,R_q,D]`` (or ``q [B,T,H,D]`` for
        KVonly), the cacheable key/value factors named as in :meth:`cache_spec`, and ``gate`` when used.
        """
        bsz, seq, _ = x.shape
        sizes = [size for _, size in self.segments]
        parts = dict(zip([name for name, _ in self.segments], self.proj(x).split(sizes, dim=-1)))
        out: dict[str, torch.Tensor] = {}
        if self.factorize_q:
            out["a_q"] = self._factor(parts, "a_q", bsz, seq)
            b_q = self._factor(parts, "b_q", bsz, seq)
            c_q = self._factor(parts, "c_q", bsz, seq) if self.order == 3 else None
            out["b_q"] = self._features(apply_partial_rotary(b_q, cos, sin), c_q)
        else:
            q = parts["q"].reshape(bsz, seq, self.num_heads, self.head_dim)
            out["q"] = self._rope(q, cos, sin)
        for name in ("a_k", "a_v", "c_k", "c_v", "b_v"):
            if name in self.factor_shapes and self._is_contextual(name):
                out[name] = self._factor(parts, name, bsz, seq)
        if self.contextual_b:
            b_k = self._factor(parts, "b_k", bsz, seq)
            if self.share_kv_b:
                out["b_kv"] = b_k
            else:
                out["b_k"] = apply_partial_rotary(b_k, cos, sin)
        if self.output_gate:
            out["gate"] = parts["gate"].reshape(bsz, seq, self.num_heads, self.value_dim)
        return out

    def _key_value_factors(self, kv: dict[str, torch.Tensor], bsz: int, length: int, ctx: AttentionContext):
        """Full key/value factors ``a_k, b_k, a_v, b_v`` (features expanded for third order)."""

        def get(name: str) -> torch.Tensor:
            if name in kv:
                return kv[name]
            return self._factor({}, name, bsz, length)

        def key_rotation():  # RoPE tables of the key positions: the cached slots, or the new tokens
            if ctx.cache is None:
                return ctx.cos, ctx.sin
            if ctx.step.key_cos is not None:
                return ctx.step.key_cos, ctx.step.key_sin
            return ctx.rotary(ctx.kv_cache.cached_positions(length), dtype=ctx.cos.dtype)

        if self.share_kv_b:  # the shared factor is held unrotated: rotate it for the keys only
            b_v = kv["b_kv"] if "b_kv" in kv else get("b_k")
            b_k = apply_partial_rotary(b_v, *key_rotation())
        else:
            b_k, b_v = get("b_k"), get("b_v")
            if not self.contextual_b:  # learned parameters: rotate by the key positions now
                b_k = apply_partial_rotary(b_k, *key_rotation())
        a_k, a_v = get("a_k"), get("a_v")
        if self.order == 3:
            b_k = self._features(b_k, get("c_k"))
            b_v = self._features(b_v, get("c_v"))
        return a_k, b_k, a_v, b_v

    # ------------------------------------------------------------------ forward

    def _query_factors(self, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factorize_q:
            return f["a_q"], f["b_q"]
        q = f["q"]  # a standard query is TPA with a_q = H * e_i and b_q = q_i (Section 4.1)
        bsz, seq, heads, _ = q.shape
        eye = torch.eye(heads, dtype=q.dtype, device=q.device) * heads
        return eye.expand(bsz, seq, heads, heads), q

    def _use_decode_kernel(self, ctx: AttentionContext, new_tokens: int) -> bool:
        # the kernel reads the plain factor cache; other variants use the reference path
        return self.kernel_layout and self.decode_kernel_applies(ctx, new_tokens)

    def _segments_of_proj(self) -> dict[str, Segment]:
        """Where each token-dependent part (contextual factors, ``q``, ``gate``) lies in a row of ``proj``'s
        output; ``b_q``, ``q`` and ``b_k`` rotated (read per call: tensor parallelism narrows ``segments``)."""
        where, offset = {}, 0
        for name, size in self.segments:
            plain = (self.num_heads, self.value_dim if name == "gate" else self.head_dim)  # q and gate
            rows, width = self.factor_shapes.get(name, plain)
            where[name] = Segment(offset, rows, width, rotate=name in ("b_q", "q", "b_k"))
            offset += size
        return where

    def _static_step_factors(self, x: torch.Tensor, ctx: AttentionContext) -> dict[str, torch.Tensor]:
        """:meth:`factors` and the cache write of a static one-token step, RoPE and write in one launch
        (:meth:`static_step_write`): the query factors (``a_q`` and ``b_q``, or ``q``) and ``gate``,
        each ``[B, 1, rows, width]``."""
        bsz = x.shape[0]
        projected = self.proj(x)
        where = self._segments_of_proj()
        query = "b_q" if self.factorize_q else "q"
        writes = [(where[name], name) for name in ("a_k", "b_k", "a_v", "b_v")]
        f = {query: self.static_step_write(projected, ctx, where[query], writes)}
        for name in ("a_q", "gate"):
            if name in where:
                seg = where[name]
                f[name] = projected[..., seg.offset: seg.offset + seg.size].reshape(bsz, 1, seg.rows, seg.width)
        return f

    def _fused_step(self, ctx: AttentionContext, new_tokens: int) -> bool:
        """A static one-token step the decode kernel attends (plain layout, no head activation)."""
        return self.kernel_layout and self.head_activation == "none" and self.fused_step_applies(ctx, new_tokens)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        check_hidden(x, self.hidden_size, type(self).__name__)
        bsz, seq, _ = x.shape
        if self._fused_step(ctx, seq):  # the cache is written here, for the decode kernel below
            f = self._static_step_factors(x, ctx)
        else:
            f = self.factors(x, ctx.cos, ctx.sin)
            new = {name: f[name] for name in self.cache_spec()}
            kv = new if ctx.cache is None else ctx.cache.update(ctx.step, **new)

        if self._use_decode_kernel(ctx, seq):
            a_q, b_q = self._query_factors(f)
            buf = ctx.cache.buffer
            backend = "triton" if ctx.decode_impl == "kernel" else "auto"
            out = tpa_decode(a_q, b_q, buf("a_k"), buf("b_k"), buf("a_v"), buf("b_v"), ctx.step.kernel_seqlens,
                             backend=backend, options=self.decode_options)
        else:
            length, mask = (seq, ctx.mask) if ctx.cache is None else (ctx.step.kv_len, ctx.step.mask)
            a_k, b_k, a_v, b_v = self._key_value_factors(kv, bsz, length, ctx)
            if self.attn_impl == "factors" and ctx.attention_weights is None:
                a_q, b_q = self._query_factors(f)
                out = tpa_attention_factors(a_q, b_q, a_k, b_k, a_v, b_v, mask=mask, causal=True)
            else:
                # fused Triton op on CUDA (Q, K and V in one memory-bound launch each way), the einsum
                # twin elsewhere
                pairs = [(f["a_q"], f["b_q"])] if self.factorize_q else []
                *q, k, v = tpa_materialize_many(pairs + [(a_k, b_k), (a_v, b_v)])
                out = attend(q[0] if q else f["q"], k, v, mask, weights_out=ctx.attention_weights)
        return self._output(out, f, bsz, seq)

    def _output(self, out: torch.Tensor, f: dict[str, torch.Tensor], bsz: int, seq: int) -> torch.Tensor:
        """Attention output ``[B, T, H, E]`` -> ``[B, T, C]``: head norm, gate, output projection."""
        out = self.norm_heads(out)
        if self.output_gate:
            out = out * torch.sigmoid(f["gate"])
        return self.o_proj(out.reshape(bsz, seq, self.num_heads * self.value_dim))
