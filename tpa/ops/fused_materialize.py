"""Fused materialisation of Q, K or V from TPA factors (forward) and of the factor gradients (backward).

``out[b, t, h, d] = scale * sum_r a[b, t, r, h] * b[b, t, r, d]`` (the paper's eq. 3.1 with
``scale = 1/R``) is a batch of tiny matrix products with the rank (1 to 8) as the inner dimension:
one per token. PyTorch runs it as a batched GEMM (``aten::bmm``) whose tiles are almost all padding.
Here it is what it is, a memory-bound broadcast: per token the forward reads ``R * (H + D)`` numbers
and writes ``H * D``; the backward reads the ``H * D`` output gradient and the factors once and
writes ``R * (H + D)``:

    grad_a[r, h] = scale * sum_d g[h, d] b[r, d],    grad_b[r, d] = scale * sum_h g[h, d] a[r, h].

The stack, bottom to top:

- ``_materialize_fwd_kernel``: one program per ``BLOCK_T`` tokens (flattened over batch and time),
  looping over blocks of ``BLOCK_H`` heads and storing one ``[BLOCK_T, BLOCK_H, D]`` tile each.
  16-bit inputs: per token a ``[BLOCK_H, R] x [R, D]`` product on tensor cores (``tl.dot``, rank
  zero-padded to 16: exact products, float32 sums), which keeps the instruction count per output
  element low enough for the kernel to stay memory-bound. float32/float64: broadcast
  multiply-adds.
- ``_materialize_bwd_kernel``: one program per ``BLOCK_T`` tokens; the output gradient of a head
  block is loaded once and both factor gradients are reduced from it (``G B^T`` and ``A^T G`` per
  token, on tensor cores for 16-bit inputs; ``grad_b`` accumulates across head blocks).
- ``materialize_fwd_triton`` / ``materialize_bwd_triton``: host launchers.
- ``torch.ops.tpa.materialize`` (with ``torch.ops.tpa.materialize_backward`` as its autograd
  formula): a ``torch.library.custom_op`` with a fake (meta) implementation, so ``torch.compile``
  treats it as one opaque op, with autograd and without a graph break.
- ``tpa_materialize``: the public function: validates, applies autocast as ``einsum`` would, and
  dispatches to the op or to the reference twin :func:`tpa.ops.naive.materialize`.

Why ``custom_op`` and not ``triton_op``: a ``triton_op`` is decomposed by torch.compile into its
kernel launch, which inductor compiles for a GPU, so on CPU (Triton's interpreter) it runs eagerly
only, and ``wrap_triton`` in torch 2.11 rejects interpreted kernels; defining it also imports triton
and inductor at once, where this repository imports triton on first use. A ``custom_op`` is defined
at import without triton and behaves the same compiled or eager, on GPU or under the interpreter
(so the tests cover the registration as it runs in training); inductor calls it as one extern
kernel. Neither lets inductor fuse the kernels with their neighbours.

(The module is not called ``materialize``: ``tpa.ops.materialize`` is the reference twin's name.)

Accumulation is in float32 (float64 for float64 inputs); the output and the gradients are in the
input dtype. Inputs may be any strided views (slices of a fused projection) whose last dimension
has unit stride; others are made contiguous first. Triton is imported lazily, on the first call of
the Triton path; on CPU tensors that path runs under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton's first import), eagerly or inside ``torch.compile`` (the op is opaque there).
"""

from __future__ import annotations

import functools
import importlib.util
import struct
from dataclasses import dataclass

import torch

from tpa.ops.decode import _next_pow2, triton_interpreter_active
from tpa.ops.naive import materialize as materialize_reference

__all__ = ["MaterializeConfig", "default_configs", "materialize_bwd_triton", "materialize_fwd_triton", "tpa_materialize"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
# The auto backend takes the kernel up to these sizes (the tested range); backend="triton" has no limit.
_AUTO_MAX = {"rank": 16, "feature": 256, "heads": 1024}

# Launch heuristic (default_configs), from SASS instruction counts per useful output element on
# sm_90 (not yet from timings; scripts/bench_materialize.py --sweep measures alternatives).
# ``tile``: elements of one [BLOCK_T, BLOCK_H, BLOCK_D] tile; ``single_max``: all heads in one block
# when next_pow2(H) * BLOCK_D fits; ``fma_*``: the same for float32/float64 (no tensor cores).
_HEURISTIC = {
    "tile": 16384, "single_max": 32768, "warps": 4,
    "fma_tile": 2048, "fma_single_max": 4096, "fma_min_block_h": 8,
    "max_block_t": 16,
}

# Test hook: when True, the launchers fill the buffers they allocate with NaN before the kernels run.
_POISON_BUFFERS = False


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions, wrapped by ``triton.jit`` in ``_kernels()`` after ``tl`` is bound.
# --------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _kernels()
_round_bf16_jit = None  # triton.jit(_round_bf16), bound by _kernels()


def _round_bf16(x, FIX: tl.constexpr):
    """Round float32 ``x`` to the nearest bfloat16 value (ties to even), kept in float32, when FIX.

    Only for Triton's interpreter, whose float32 -> bfloat16 cast truncates; compiled code rounds
    to nearest even in the cast itself (FIX is False there)."""
    if FIX:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


def _materialize_fwd_kernel(
    A, B, OUT,
    n_tok, seq, scale_hi, scale_lo,
    s_a_b, s_a_t, s_a_r,
    s_b_b, s_b_t, s_b_r,
    R: tl.constexpr, H: tl.constexpr, D: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """OUT [n_tok, H, D] contiguous = scale * sum_r A[tok, r, :, None] * B[tok, r, None, :].

    Token ``tok`` is (batch ``tok // seq``, time ``tok % seq``); A and B have unit stride in their
    last dimension. ``scale = scale_hi + scale_lo`` (two float32 parts, exact enough for float64).
    DOT: per token a ``[BLOCK_H, R_PAD] x [R_PAD, BLOCK_D]`` tensor-core product (16-bit inputs,
    exact products, float32 sums; ranks beyond R are zero). Otherwise broadcast products in ACC.
    IEEE (the interpreter): the products in float32 on operands upcast from 16 bits."""
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: B * T < 2**31 is checked by the launcher
    t_ok = tok < n_tok
    bi = tok // seq
    ti = tok - bi * seq
    a_tok = A + bi.to(tl.int64) * s_a_b + ti.to(tl.int64) * s_a_t  # [BLOCK_T] pointers
    b_tok = B + bi.to(tl.int64) * s_b_b + ti.to(tl.int64) * s_b_t
    o_tok = OUT + tok.to(tl.int64) * (H * D)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    if DOT:
        b3 = tl.load(b_tok[:, None, None] + offs_r[None, :, None] * s_b_r + offs_d[None, None, :],
                     mask=t_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :], other=0.0)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        if DOT:
            a3 = tl.load(a_tok[:, None, None] + offs_r[None, None, :] * s_a_r + offs_h[None, :, None],
                         mask=t_ok[:, None, None] & h_ok[None, :, None] & r_ok[None, None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a3.to(tl.float32), b3.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a3, b3)  # [BLOCK_T, BLOCK_H, BLOCK_D]
        else:
            acc = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=ACC)
            for r in tl.static_range(R):
                a_r = tl.load(a_tok[:, None] + r * s_a_r + offs_h[None, :],
                              mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(ACC)  # [BLOCK_T, BLOCK_H]
                b_r = tl.load(b_tok[:, None] + r * s_b_r + offs_d[None, :],
                              mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)  # [BLOCK_T, BLOCK_D]
                acc += a_r[:, :, None] * b_r[:, None, :]
        out = _round_bf16_jit(acc * scale, FIX_BF16)
        o_ptr = o_tok[:, None, None] + offs_h[None, :, None] * D + offs_d[None, None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty),
                 mask=t_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :])


def _materialize_bwd_kernel(
    G, A, B, GA, GB,
    n_tok, seq, scale_hi, scale_lo,
    s_g_b, s_g_t, s_g_h,
    s_a_b, s_a_t, s_a_r,
    s_b_b, s_b_t, s_b_r,
    R: tl.constexpr, H: tl.constexpr, D: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """GA [n_tok, R, H] = scale * sum_d G[tok, :, d] B[tok, r, d];
    GB [n_tok, R, D] = scale * sum_h G[tok, h, :] A[tok, r, h] (GA, GB contiguous).

    The output gradient of a head block is loaded once and both gradients are reduced from it.
    DOT (16-bit inputs): per token ``G [BLOCK_H, BLOCK_D] x B^T [BLOCK_D, R_PAD]`` and
    ``A^T [R_PAD, BLOCK_H] x G [BLOCK_H, BLOCK_D]`` on tensor cores, GB accumulating across head
    blocks in the product's float32 accumulator. Otherwise broadcast products and sums in ACC: with
    one head block (``BLOCK_H >= H``) GB rows are stored as reduced, else they accumulate in a
    ``[BLOCK_T, R_PAD, BLOCK_D]`` tile (row r selected by a mask)."""
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tok < n_tok
    bi = tok // seq
    ti = tok - bi * seq
    bi64 = bi.to(tl.int64)
    ti64 = ti.to(tl.int64)
    g_tok = G + bi64 * s_g_b + ti64 * s_g_t
    a_tok = A + bi64 * s_a_b + ti64 * s_a_t
    b_tok = B + bi64 * s_b_b + ti64 * s_b_t
    ga_tok = GA + tok.to(tl.int64) * (R * H)
    gb_tok = GB + tok.to(tl.int64) * (R * D)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    out_ty = GA.dtype.element_ty
    gb_acc = tl.zeros([BLOCK_T, R_PAD, BLOCK_D], dtype=ACC)
    if DOT:
        b_t = tl.load(b_tok[:, None, None] + offs_r[None, None, :] * s_b_r + offs_d[None, :, None],
                      mask=t_ok[:, None, None] & d_ok[None, :, None] & r_ok[None, None, :], other=0.0)  # [BT, BD, RP]
        if IEEE:
            b_t = b_t.to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        th_ok = t_ok[:, None] & h_ok[None, :]
        g = tl.load(g_tok[:, None, None] + offs_h.to(tl.int64)[None, :, None] * s_g_h + offs_d[None, None, :],
                    mask=th_ok[:, :, None] & d_ok[None, None, :], other=0.0)  # [BT, BH, BD]
        if DOT:
            a_t = tl.load(a_tok[:, None, None] + offs_r[None, :, None] * s_a_r + offs_h[None, None, :],
                          mask=t_ok[:, None, None] & r_ok[None, :, None] & h_ok[None, None, :], other=0.0)
            if IEEE:
                g = g.to(tl.float32)
                ga = tl.dot(g, b_t, input_precision="ieee")  # [BT, BH, RP]
                gb_acc = tl.dot(a_t.to(tl.float32), g, gb_acc, input_precision="ieee")  # [BT, RP, BD]
            else:
                ga = tl.dot(g, b_t)
                gb_acc = tl.dot(a_t, g, gb_acc)
            ga = _round_bf16_jit(ga * scale, FIX_BF16)
            tl.store(ga_tok[:, None, None] + offs_r[None, None, :] * H + offs_h[None, :, None], ga.to(out_ty),
                     mask=th_ok[:, :, None] & r_ok[None, None, :])
        else:
            g = g.to(ACC)
            for r in tl.static_range(R):
                a_r = tl.load(a_tok[:, None] + r * s_a_r + offs_h[None, :], mask=th_ok, other=0.0).to(ACC)
                b_r = tl.load(b_tok[:, None] + r * s_b_r + offs_d[None, :],
                              mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
                ga = _round_bf16_jit(tl.sum(g * b_r[:, None, :], axis=2) * scale, FIX_BF16)  # [BT, BH]
                tl.store(ga_tok[:, None] + r * H + offs_h[None, :], ga.to(out_ty), mask=th_ok)
                part = tl.sum(g * a_r[:, :, None], axis=1)  # [BT, BD]
                if BLOCK_H >= H:  # one head block: this row of GB is complete
                    gb = _round_bf16_jit(part * scale, FIX_BF16)
                    tl.store(gb_tok[:, None] + r * D + offs_d[None, :], gb.to(out_ty),
                             mask=t_ok[:, None] & d_ok[None, :])
                else:
                    gb_acc += tl.where(offs_r[None, :, None] == r, part[:, None, :], 0.0)
    if DOT or BLOCK_H < H:
        gb = _round_bf16_jit(gb_acc * scale, FIX_BF16)
        tl.store(gb_tok[:, None, None] + offs_r[None, :, None] * D + offs_d[None, None, :], gb.to(out_ty),
                 mask=t_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :])


@functools.lru_cache(maxsize=1)
def _kernels():
    """The two kernels, wrapped by ``triton.jit`` on first use (interpreted under TRITON_INTERPRET=1)."""
    import triton
    import triton.language as language

    globals()["tl"] = language
    globals()["_round_bf16_jit"] = triton.jit(_round_bf16)
    # token counts vary with batch and sequence length: never specialise on them
    fwd = triton.jit(_materialize_fwd_kernel, do_not_specialize=["n_tok", "seq"])
    bwd = triton.jit(_materialize_bwd_kernel, do_not_specialize=["n_tok", "seq"])
    return fwd, bwd


# --------------------------------------------------------------------------------------------
# Launch parameters (from H, D and the rank only).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaterializeConfig:
    """Launch parameters of one kernel.

    Attributes:
        block_t: tokens per program (power of two).
        block_h: heads per block (power of two; >= 16 with ``dot``); the kernels loop over head blocks.
        num_warps: Triton launch option.
        dot: per-token products on tensor cores (``tl.dot``, 16-bit inputs only) instead of
            broadcast multiply-adds.
    """

    block_t: int
    block_h: int
    num_warps: int
    dot: bool = False

    def __post_init__(self):
        for name in ("block_t", "block_h", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
                raise ValueError(f"MaterializeConfig.{name} must be a power of two >= 1, got {v!r}")
        if self.dot and self.block_h < 16:
            raise ValueError(f"MaterializeConfig: dot needs block_h >= 16, got {self.block_h}")

    def as_list(self) -> list[int]:
        return [self.block_t, self.block_h, self.num_warps, int(self.dot)]


def _block_d(feature_dim: int, dot: bool) -> int:
    return max(16 if dot else 1, _next_pow2(feature_dim))


def _least_padding_block(heads: int, lo: int, hi: int) -> int:
    """The largest power of two in ``[lo, hi]`` whose multiple covering ``heads`` is smallest."""
    best, best_pad = lo, None
    bh = lo
    while bh <= hi:
        pad = -(-heads // bh) * bh
        if best_pad is None or pad <= best_pad:
            best, best_pad = bh, pad
        bh *= 2
    return best


def _pick(num_heads: int, feature_dim: int, dot: bool, single_block: bool) -> MaterializeConfig:
    """One head block of ``next_pow2(H)`` when ``single_block`` and ``next_pow2(H) * BLOCK_D`` is
    at most ``single_max``, else blocks of the power of two that pads H least; ``block_t`` tokens
    fill about ``tile`` elements (half that with several head blocks, whose loop holds more state);
    tensor-core tiles beyond ``tile`` (one token of many heads) get twice the warps."""
    k = _HEURISTIC
    tile, single_max = (k["tile"], k["single_max"]) if dot else (k["fma_tile"], k["fma_single_max"])
    block_d = _block_d(feature_dim, dot)
    min_block_h = 16 if dot else min(k["fma_min_block_h"], _next_pow2(num_heads))
    h_pow2 = max(min_block_h, _next_pow2(num_heads))
    if single_block and h_pow2 * block_d <= single_max:
        block_h = h_pow2
    else:
        block_h = _least_padding_block(num_heads, min_block_h, max(min_block_h, min(h_pow2, tile // block_d)))
        if block_h < num_heads:
            tile //= 2
    block_t = max(1, min(k["max_block_t"], tile // (block_h * block_d)))
    warps = 2 * k["warps"] if dot and block_t * block_h * block_d > tile else k["warps"]
    return MaterializeConfig(block_t, block_h, warps, dot)


def default_configs(
    num_heads: int, feature_dim: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[MaterializeConfig, MaterializeConfig]:
    """Launch parameters ``(forward, backward)`` from the head count H, the feature size D and dtype.

    16-bit inputs use tensor-core products, with all heads in one block while the per-token tile
    ``next_pow2(H) x next_pow2(D)`` has at most ``single_max`` elements (H=34, D=64: one block of 64
    heads and 4 tokens per program; masked heads cost instructions, not bandwidth), else blocks of
    the power of two that pads H least. float32/float64 use broadcast multiply-adds with smaller
    tiles (``fma_*``); their forward always takes the least-padding blocks (H=34: 5 blocks of 8).
    """
    if dtype in (torch.float16, torch.bfloat16):
        cfg = _pick(num_heads, feature_dim, True, True)
        return cfg, cfg
    return _pick(num_heads, feature_dim, False, False), _pick(num_heads, feature_dim, False, True)


# --------------------------------------------------------------------------------------------
# Host launchers (inputs already validated by tpa_materialize).
# --------------------------------------------------------------------------------------------


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@functools.lru_cache(maxsize=256)
def _scale_parts(scale: float) -> tuple[float, float]:
    """``scale`` as float32 high part + float32 low part (Triton passes Python floats as float32)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, float(scale - hi)


def _launch_args(ref: torch.Tensor, config: MaterializeConfig, rank: int, dim: int) -> dict:
    """Constexpr launch arguments shared by both kernels."""
    interpret = ref.device.type != "cuda"
    if interpret and not triton_interpreter_active():
        raise RuntimeError(
            "tpa_materialize: the Triton kernel on CPU tensors needs Triton's interpreter; set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    if config.dot and ref.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"tpa_materialize: MaterializeConfig(dot=True) needs float16/bfloat16 inputs, got {ref.dtype}")
    return _constexprs(config, rank, dim, ref.dtype, interpret)


@functools.lru_cache(maxsize=256)
def _constexprs(config: MaterializeConfig, rank: int, dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """The launch's constexpr arguments, computed once per (config, rank, dim, dtype, device kind): the
    op runs once per Q, K and V in every layer, so its host path stays short."""
    import triton.language as language

    return dict(
        R=rank, R_PAD=max(16, _next_pow2(rank)) if config.dot else _next_pow2(rank),
        BLOCK_T=config.block_t, BLOCK_H=config.block_h, BLOCK_D=_block_d(dim, config.dot),
        DOT=config.dot, IEEE=interpret,  # the interpreter's 16-bit dot is unreliable: float32 operands there
        ACC=language.float64 if dtype == torch.float64 else language.float32,
        FIX_BF16=interpret and dtype == torch.bfloat16,
        num_warps=config.num_warps,
    )


def _check_tokens(n_tok: int) -> None:
    if n_tok >= 2**31:
        raise ValueError(f"tpa_materialize: B * T = {n_tok} tokens; the kernels index tokens in int32 (< 2**31)")


def materialize_fwd_triton(a: torch.Tensor, b: torch.Tensor, scale: float, config: MaterializeConfig) -> torch.Tensor:
    """Launch the forward kernel: ``a [B, T, R, H]``, ``b [B, T, R, D]`` -> ``[B, T, H, D]`` contiguous."""
    bsz, seq, rank, heads = a.shape
    dim = b.shape[-1]
    out = torch.empty((bsz, seq, heads, dim), dtype=a.dtype, device=a.device)
    if _POISON_BUFFERS:
        out.fill_(float("nan"))
    n_tok = bsz * seq
    if n_tok == 0:
        return out
    _check_tokens(n_tok)
    a, b = _unit_last(a), _unit_last(b)
    meta = _launch_args(a, config, rank, dim)
    fwd, _ = _kernels()
    hi, lo = _scale_parts(scale)
    fwd[(-(-n_tok // config.block_t),)](
        a, b, out, n_tok, seq, hi, lo,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        H=heads, D=dim, **meta,
    )
    return out


def materialize_bwd_triton(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, config: MaterializeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``grad [B, T, H, D]`` -> ``(grad_a [B, T, R, H], grad_b [B, T, R, D])``,
    both contiguous in the dtype of ``a``."""
    bsz, seq, rank, heads = a.shape
    dim = b.shape[-1]
    grad_a = torch.empty((bsz, seq, rank, heads), dtype=a.dtype, device=a.device)
    grad_b = torch.empty((bsz, seq, rank, dim), dtype=a.dtype, device=a.device)
    if _POISON_BUFFERS:
        grad_a.fill_(float("nan"))
        grad_b.fill_(float("nan"))
    n_tok = bsz * seq
    if n_tok == 0:
        return grad_a, grad_b
    _check_tokens(n_tok)
    grad, a, b = _unit_last(grad.to(a.dtype)), _unit_last(a), _unit_last(b)
    meta = _launch_args(a, config, rank, dim)
    _, bwd = _kernels()
    hi, lo = _scale_parts(scale)
    bwd[(-(-n_tok // config.block_t),)](
        grad, a, b, grad_a, grad_b, n_tok, seq, hi, lo,
        grad.stride(0), grad.stride(1), grad.stride(2),
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        H=heads, D=dim, **meta,
    )
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------
# The custom ops: torch.ops.tpa.materialize and its backward. ``config`` carries the launch
# parameters as eight ints: forward (block_t, block_h, num_warps, dot), then backward.
# --------------------------------------------------------------------------------------------


def _split_config(config: list[int]) -> tuple[MaterializeConfig, MaterializeConfig]:
    return _split_config_cached(tuple(config))


@functools.lru_cache(maxsize=256)
def _split_config_cached(config: tuple[int, ...]) -> tuple[MaterializeConfig, MaterializeConfig]:
    f, b = config[:4], config[4:8]
    return MaterializeConfig(*f[:3], bool(f[3])), MaterializeConfig(*b[:3], bool(b[3]))


@torch.library.custom_op("tpa::materialize", mutates_args=())
def _materialize_op(a: torch.Tensor, b: torch.Tensor, scale: float, config: list[int]) -> torch.Tensor:
    return materialize_fwd_triton(a, b, scale, _split_config(config)[0])


@_materialize_op.register_fake
def _(a, b, scale, config):
    return a.new_empty((a.shape[0], a.shape[1], a.shape[3], b.shape[3]))


@torch.library.custom_op("tpa::materialize_backward", mutates_args=())
def _materialize_backward_op(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, config: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    return materialize_bwd_triton(grad, a, b, scale, _split_config(config)[1])


@_materialize_backward_op.register_fake
def _(grad, a, b, scale, config):
    return a.new_empty(a.shape), b.new_empty(b.shape, dtype=a.dtype)


def _setup_context(ctx, inputs, output):
    a, b, scale, config = inputs
    ctx.save_for_backward(a, b)
    ctx.scale, ctx.config = scale, config


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a, grad_b = _materialize_backward_op(grad, a, b, ctx.scale, ctx.config)
    return grad_a, grad_b, None, None


_materialize_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tpa_materialize: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"tpa_materialize: {name} must have 4 dimensions [B, T, R, X], got shape {tuple(t.shape)}")
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(
            f"tpa_materialize: a {tuple(a.shape)} = [B, T, R, H] and b {tuple(b.shape)} = [B, T, R, D] "
            "must agree in B, T and R"
        )
    if a.shape[2] < 1:
        raise ValueError("tpa_materialize: the rank R must be >= 1")
    if a.device != b.device:
        raise ValueError(f"tpa_materialize: a is on {a.device}, b on {b.device}; both must share a device")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"tpa_materialize: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def tpa_materialize(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    fwd_config: MaterializeConfig | None = None,
    bwd_config: MaterializeConfig | None = None,
) -> torch.Tensor:
    """Form Q (or K, V) from TPA factors: ``scale * sum_r a[..., r, :, None] * b[..., r, None, :]``.

    Args:
        a: ``[B, T, R, H]`` head factors; any strides (a slice of a fused projection is used in
            place when its last dimension has unit stride).
        b: ``[B, T, R, D]`` feature factors (RoPE already applied for Q and K).
        scale: default ``1/R`` (eq. 3.1).
        backend: ``"auto"``: the fused Triton op for CUDA tensors (Triton installed, R <= 16,
            D <= 256, H <= 1024), otherwise the reference twin :func:`tpa.ops.naive.materialize`.
            ``"triton"``: always the op; on CPU tensors it runs under Triton's interpreter (slow;
            for tests). ``"reference"``: the twin.
        fwd_config, bwd_config: optional launch parameters (tests, benchmarks); default
            :func:`default_configs`.

    Returns:
        ``[B, T, H, D]``, contiguous for the Triton op. Under autocast the factors are first cast to
        the autocast dtype (float64 ones excepted), as for ``torch.einsum``; the result has the
        factors' dtype.
        Differentiable in ``a`` and ``b`` (the Triton op computes both gradients in one kernel,
        float32 accumulation).

    Raises:
        TypeError: non-tensor inputs, unsupported dtypes, or factors of different dtypes (outside autocast).
        ValueError: not 4-dimensional, ``a``/``b`` disagreeing in B, T or R, different devices,
            an unknown backend.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"tpa_materialize: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    _check(a, b)
    device_type = a.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast treats einsum: float64 stays, the rest is cast
        dtype = torch.get_autocast_dtype(device_type)
        a, b = (t if t.dtype == torch.float64 else t.to(dtype) for t in (a, b))
    if a.dtype != b.dtype:
        raise TypeError(f"tpa_materialize: a ({a.dtype}) and b ({b.dtype}) must share one dtype")
    rank, heads, dim = a.shape[2], a.shape[3], b.shape[3]
    if backend == "auto":
        use_triton = (
            device_type == "cuda" and _HAVE_TRITON and rank <= _AUTO_MAX["rank"]
            and dim <= _AUTO_MAX["feature"] and heads <= _AUTO_MAX["heads"]
        )
    elif backend == "triton":
        if not _HAVE_TRITON:
            raise RuntimeError("tpa_materialize: backend='triton' needs the triton package")
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"tpa_materialize: backend='triton' runs on CUDA (or CPU via the interpreter), not {a.device}")
        use_triton = True
    else:
        use_triton = False
    if not use_triton:
        return materialize_reference(a, b, scale=scale)
    if scale is None:
        scale = 1.0 / rank
    fwd_default, bwd_default = default_configs(heads, dim, a.dtype)
    fwd, bwd = fwd_config or fwd_default, bwd_config or bwd_default
    return _materialize_op(a, b, float(scale), fwd.as_list() + bwd.as_list())
