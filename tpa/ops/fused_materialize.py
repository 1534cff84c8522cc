"""Fused materialisation of Q, K or V from TPA factors (forward) and of the factor gradients (backward).

``out[b, t, h, d] = scale * sum_r a[b, t, r, h] * b[b, t, r, d]`` (the paper's eq. 3.1 with
``scale = 1/R``) is a batch of tiny matrix products with the rank (1 to 8) as the inner dimension:
one per token. PyTorch runs it as a batched GEMM (``aten::bmm``) whose tiles are almost all padding.
Here it is what it is, a memory-bound broadcast: per token the forward reads ``R * (H + D)`` numbers
and writes ``H * D``; the backward reads the ``H * D`` output gradient and the factors once and
writes ``R * (H + D)``:

    grad_a[r, h] = scale * sum_d g[h, d] b[r, d],    grad_b[r, d] = scale * sum_h g[h, d] a[r, h].

The stack, bottom to top:

- :mod:`tpa.ops.kernels.materialize` (``triton.jit``, imported only where Triton is installed, on the
  first call of the Triton path): ``_fwd_part``, one program's ``BLOCK_T`` tokens (flattened over
  batch and time) of one factor pair, looping over blocks of ``BLOCK_H`` heads and storing one
  ``[BLOCK_T, BLOCK_H, D]`` tile each. 16-bit inputs: per token a ``[BLOCK_H, R] x [R, D]`` product
  on tensor cores (``tl.dot``, rank zero-padded to 16: exact products, float32 sums), which keeps
  the instruction count per output element low enough for the kernel to stay memory-bound.
  float32/float64: broadcast multiply-adds. ``_bwd_part``: the same tokens' backward; the output
  gradient of a head block is loaded once and both factor gradients are reduced from it (``G B^T``
  and ``A^T G`` per token, on tensor cores for 16-bit inputs; ``grad_b`` accumulates across head
  blocks). ``materialize_fwd_kernel`` / ``materialize_bwd_kernel``: one launch for up to three
  factor pairs (a layer's Q, K and V: the ranks, lengths and feature sizes may differ, the head
  count is shared); each program runs its token block of every pair in turn.
- ``materialize_fwd_triton`` / ``materialize_bwd_triton``: host launchers.
- Two registrations of the op (lists of factor pairs, each with its backward op as its autograd
  formula), chosen per call by :attr:`MaterializeLaunchOptions.registration`:

  - ``torch.ops.tpa.materialize_triton`` (``torch.library.triton_op``, registered at import when
    Triton is installed), taken for CUDA tensors: torch.compile sees the kernel launches inside it
    (``wrap_triton``) and inductor emits them into its generated code with its own launcher,
    without Python in between at run time (the ``small`` preset's training step is bound by host
    time). Its compiled form needs a GPU: inductor compiles the launches for one, and Triton's
    interpreter cannot run on fake tensors. Eagerly it runs anywhere, interpreted on CPU tensors.
  - ``torch.ops.tpa.materialize`` (``torch.library.custom_op`` with a fake implementation), taken
    for CPU tensors (Triton's interpreter): torch.compile treats it as one opaque op, so it
    behaves the same compiled or eager, on GPU or under the interpreter, and needs no Triton at
    import.

  Neither lets inductor fuse the kernels with their neighbours.
- ``tpa_materialize_many`` (a layer's Q, K and V in one op call and one launch each way: each op
  call costs a dispatch and a launch) and ``tpa_materialize`` (one pair): the public functions:
  validate, apply autocast as ``einsum`` would, and dispatch to an op or to the reference twin
  :func:`tpa.ops.naive.materialize`.

(The module is not called ``materialize``: ``tpa.ops.materialize`` is the reference twin's name.)

Accumulation is in float32 (float64 for float64 inputs); the output and the gradients are in the
input dtype. Inputs may be any strided views (slices of a fused projection) whose last dimension
has unit stride; others are made contiguous first. Triton is imported lazily, on the first call of
the Triton path; on CPU tensors that path runs under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton's first import), eagerly or inside ``torch.compile`` (the ``custom_op`` is opaque
there).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tpa.ops.naive import materialize as materialize_reference
from tpa.ops.triton_support import HAVE_TRITON, least_padding_block, next_pow2, require_runnable

__all__ = [
    "DEFAULT_LAUNCH_OPTIONS", "MaterializeConfig", "MaterializeHeuristic", "MaterializeLaunchOptions", "default_configs", "materialize_bwd_triton", "materialize_fwd_triton", "tpa_materialize",
    "tpa_materialize_many",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The auto backend takes the kernel up to these sizes (the tested range); backend="triton" has no limit.
_AUTO_MAX = {"rank": 16, "feature": 256, "heads": 1024}



@dataclass(frozen=True)
class MaterializeHeuristic:
    """Constants of the launch heuristic (:func:`default_configs`), from SASS instruction counts per
    useful output element on sm_90 (not yet from timings; ``benchmarks/dev/bench_materialize.py --sweep``
    measures alternatives).

    Attributes:
        tile: elements of one ``[BLOCK_T, BLOCK_H, BLOCK_D]`` tile (tensor-core products).
        single_max: all heads in one block when ``next_pow2(H) * BLOCK_D`` is at most this.
        warps: warps per program (twice this for tensor-core tiles beyond ``tile``).
        fma_tile, fma_single_max: the same for float32/float64 (broadcast multiply-adds).
        fma_min_block_h: smallest head block of the multiply-add path.
        max_block_t: most tokens per program.
    """

    tile: int = 16384
    single_max: int = 32768
    warps: int = 4
    fma_tile: int = 2048
    fma_single_max: int = 4096
    fma_min_block_h: int = 8
    max_block_t: int = 16


@dataclass(frozen=True)
class MaterializeLaunchOptions:
    """How the materialisation op is configured and registered (one object per caller).

    Attributes:
        heuristic: constants of :func:`default_configs`.
        registration: ``"auto"`` (the ``triton_op`` for CUDA tensors, the ``custom_op`` otherwise),
            ``"custom_op"`` or ``"triton_op"`` (tests and A/B measurements).
        poison_buffers: test hook; the launchers fill the buffers they allocate with NaN first.
    """

    heuristic: MaterializeHeuristic = field(default_factory=MaterializeHeuristic)
    registration: str = "auto"
    poison_buffers: bool = False

    def __post_init__(self):
        if self.registration not in ("auto", "custom_op", "triton_op"):
            raise ValueError(
                f"MaterializeLaunchOptions.registration must be 'auto', 'custom_op' or 'triton_op', "
                f"got {self.registration!r}"
            )


DEFAULT_LAUNCH_OPTIONS = MaterializeLaunchOptions()

# Factor pairs one kernel launch takes (Q, K and V of a layer).
_MAX_PARTS = 3


@functools.lru_cache(maxsize=1)
def _kernels():
    """The forward and backward kernels (:mod:`tpa.ops.kernels.materialize`, imported on first use)."""
    from tpa.ops.kernels.materialize import materialize_bwd_kernel, materialize_fwd_kernel

    return materialize_fwd_kernel, materialize_bwd_kernel


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
    return max(16 if dot else 1, next_pow2(feature_dim))


def _pick(
    num_heads: int, feature_dim: int, dot: bool, single_block: bool, k: MaterializeHeuristic
) -> MaterializeConfig:
    """One head block of ``next_pow2(H)`` when ``single_block`` and ``next_pow2(H) * BLOCK_D`` is
    at most ``single_max``, else blocks of the power of two that pads H least; ``block_t`` tokens
    fill about ``tile`` elements (half that with several head blocks, whose loop holds more state);
    tensor-core tiles beyond ``tile`` (one token of many heads) get twice the warps."""
    tile, single_max = (k.tile, k.single_max) if dot else (k.fma_tile, k.fma_single_max)
    block_d = _block_d(feature_dim, dot)
    min_block_h = 16 if dot else min(k.fma_min_block_h, next_pow2(num_heads))
    h_pow2 = max(min_block_h, next_pow2(num_heads))
    if single_block and h_pow2 * block_d <= single_max:
        block_h = h_pow2
    else:
        block_h = least_padding_block(num_heads, min_block_h, max(min_block_h, min(h_pow2, tile // block_d)))
        if block_h < num_heads:
            tile //= 2
    block_t = max(1, min(k.max_block_t, tile // (block_h * block_d)))
    warps = 2 * k.warps if dot and block_t * block_h * block_d > tile else k.warps
    return MaterializeConfig(block_t, block_h, warps, dot)


def default_configs(
    num_heads: int, feature_dim: int, dtype: torch.dtype = torch.bfloat16, heuristic: MaterializeHeuristic | None = None
) -> tuple[MaterializeConfig, MaterializeConfig]:
    """Launch parameters ``(forward, backward)`` from the head count H, the feature size D and dtype.

    16-bit inputs use tensor-core products, with all heads in one block while the per-token tile
    ``next_pow2(H) x next_pow2(D)`` has at most ``single_max`` elements (H=34, D=64: one block of 64
    heads and 4 tokens per program; masked heads cost instructions, not bandwidth), else blocks of
    the power of two that pads H least. float32/float64 use broadcast multiply-adds with smaller
    tiles (``fma_*``); their forward always takes the least-padding blocks (H=34: 5 blocks of 8).
    ``heuristic``: the constants (default :class:`MaterializeHeuristic`).
    """
    k = heuristic or MaterializeHeuristic()
    if dtype in (torch.float16, torch.bfloat16):
        cfg = _pick(num_heads, feature_dim, True, True, k)
        return cfg, cfg
    return _pick(num_heads, feature_dim, False, False, k), _pick(num_heads, feature_dim, False, True, k)


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


def _launch_args(
    ref: torch.Tensor, config: MaterializeConfig, heads: int, parts: tuple[tuple[int, int], ...]
) -> dict:
    """Constexpr launch arguments of either kernel for ``parts`` = ((rank, feature size), ...)."""
    interpret = ref.device.type != "cuda"
    if interpret:
        require_runnable("tpa_materialize", ref.device.type)
    if config.dot and ref.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"tpa_materialize: MaterializeConfig(dot=True) needs float16/bfloat16 inputs, got {ref.dtype}")
    return _constexprs(config, heads, parts, ref.dtype, interpret)


@functools.lru_cache(maxsize=256)
def _constexprs(
    config: MaterializeConfig, heads: int, parts: tuple[tuple[int, int], ...], dtype: torch.dtype, interpret: bool
) -> dict:
    """The launch's constexpr arguments, computed once per (config, H, parts, dtype, device kind): the
    op runs in every layer, forward and backward, so its host path stays short. Slots beyond the
    given parts repeat part 0 (their code is not compiled)."""
    meta = dict(
        PARTS=len(parts), H=heads, BLOCK_T=config.block_t, BLOCK_H=config.block_h,
        DOT=config.dot, IEEE=interpret,  # the interpreter's 16-bit dot is unreliable: float32 operands there
        FP64=dtype == torch.float64,
        FIX_BF16=interpret and dtype == torch.bfloat16,
        num_warps=config.num_warps,
    )
    for p in range(_MAX_PARTS):
        rank, dim = parts[p] if p < len(parts) else parts[0]
        meta.update({
            f"R{p}": rank, f"D{p}": dim,
            f"RP{p}": max(16, next_pow2(rank)) if config.dot else next_pow2(rank),
            f"BD{p}": _block_d(dim, config.dot),
        })
    return meta


def _check_tokens(n_tok: int) -> None:
    if n_tok >= 2**31:
        raise ValueError(f"tpa_materialize: B * T = {n_tok} tokens; the kernels index tokens in int32 (< 2**31)")


def _poisoned(t: torch.Tensor, poison: bool) -> torch.Tensor:
    return t.fill_(float("nan")) if poison else t


def _pad_parts(args: list[list]) -> list:
    """Flatten per-part argument lists, repeating part 0 in the unused slots up to ``_MAX_PARTS``."""
    flat = []
    for p in range(_MAX_PARTS):
        flat.extend(args[p] if p < len(args) else args[0])
    return flat


def _token_args(a_p: torch.Tensor, scale: float) -> list:
    """A part's ``n_tok, seq, scale_hi, scale_lo`` kernel arguments (``seq`` at least 1: it divides)."""
    bsz, seq = a_p.shape[:2]
    _check_tokens(bsz * seq)
    return [bsz * seq, max(seq, 1), *_scale_parts(scale)]


def _launch(kernel, args: list[list], shapes: list[tuple[int, int]], a: Sequence[torch.Tensor],
            config: MaterializeConfig, via_inductor: bool) -> None:
    """One launch over the parts' ``args`` (part p's head factors ``a[p]``), through ``wrap_triton``
    inside the ``triton_op``; nothing to do when no part has tokens."""
    n_max = max(a_p.shape[0] * a_p.shape[1] for a_p in a)
    if n_max == 0:
        return
    ref = a[0]
    meta = _launch_args(ref, config, ref.shape[3], tuple(shapes))
    if via_inductor:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    kernel[(-(-n_max // config.block_t),)](*_pad_parts(args), **meta)


def materialize_fwd_triton(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    scale: Sequence[float],
    config: MaterializeConfig,
    via_inductor: bool = False,
    poison: bool = False,
) -> list[torch.Tensor]:
    """Launch the forward kernel once for 1 to 3 parts (e.g. Q, K and V): part p is
    ``a[p] [B_p, T_p, R_p, H]``, ``b[p] [B_p, T_p, R_p, D_p]`` -> ``[B_p, T_p, H, D_p]`` contiguous.
    ``via_inductor``: launch through ``wrap_triton`` (inside a ``triton_op``); ``poison``: fill the
    outputs with NaN before the launch (tests)."""
    heads = a[0].shape[3]
    outs, args, shapes = [], [], []
    for a_p, b_p, s_p in zip(a, b, scale):
        bsz, seq, rank, _ = a_p.shape
        dim = b_p.shape[-1]
        out = _poisoned(torch.empty((bsz, seq, heads, dim), dtype=a_p.dtype, device=a_p.device), poison)
        outs.append(out)
        a_p, b_p = _unit_last(a_p), _unit_last(b_p)
        args.append([a_p, b_p, out, *_token_args(a_p, s_p), *a_p.stride()[:3], *b_p.stride()[:3]])
        shapes.append((rank, dim))
    _launch(_kernels()[0], args, shapes, a, config, via_inductor)
    return outs


def materialize_bwd_triton(
    grad: Sequence[torch.Tensor],
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    scale: Sequence[float],
    config: MaterializeConfig,
    via_inductor: bool = False,
    poison: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Launch the backward kernel once for 1 to 3 parts: ``grad[p] [B_p, T_p, H, D_p]`` ->
    ``(grad_a [B_p, T_p, R_p, H], grad_b [B_p, T_p, R_p, D_p])``, contiguous in the dtype of ``a[p]``."""
    heads = a[0].shape[3]
    grads, args, shapes = [], [], []
    for g_p, a_p, b_p, s_p in zip(grad, a, b, scale):
        bsz, seq, rank, _ = a_p.shape
        dim = b_p.shape[-1]
        grad_a = _poisoned(torch.empty((bsz, seq, rank, heads), dtype=a_p.dtype, device=a_p.device), poison)
        grad_b = _poisoned(torch.empty((bsz, seq, rank, dim), dtype=a_p.dtype, device=a_p.device), poison)
        grads.append((grad_a, grad_b))
        g_p, a_p, b_p = _unit_last(g_p.to(a_p.dtype)), _unit_last(a_p), _unit_last(b_p)
        args.append([g_p, a_p, b_p, grad_a, grad_b, *_token_args(a_p, s_p),
                     *g_p.stride()[:3], *a_p.stride()[:3], *b_p.stride()[:3]])
        shapes.append((rank, dim))
    _launch(_kernels()[1], args, shapes, a, config, via_inductor)
    return grads


# --------------------------------------------------------------------------------------------
# The ops (lists of 1 to 3 factor pairs) and their backward, registered twice (module docstring:
# ``tpa::materialize``, a custom_op, and ``tpa::materialize_triton``, a triton_op). ``config``
# carries the launch parameters as eight ints, forward (block_t, block_h, num_warps, dot) then
# backward, and optionally a ninth, the poison flag of the test hook.
# --------------------------------------------------------------------------------------------


def _split_config(config: list[int]) -> tuple[MaterializeConfig, MaterializeConfig]:
    return _split_config_cached(tuple(config[:8]))


@functools.lru_cache(maxsize=256)
def _split_config_cached(config: tuple[int, ...]) -> tuple[MaterializeConfig, MaterializeConfig]:
    f, b = config[:4], config[4:8]
    return MaterializeConfig(*f[:3], bool(f[3])), MaterializeConfig(*b[:3], bool(b[3]))


def _poison(config: list[int]) -> bool:
    return len(config) > 8 and bool(config[8])


def _fwd_impl(a, b, scale, config, via_inductor=False):
    return materialize_fwd_triton(a, b, scale, _split_config(config)[0], via_inductor, _poison(config))


def _bwd_impl(grad, a, b, scale, config, via_inductor=False):
    """``[grad_a_0, grad_b_0, grad_a_1, grad_b_1, ...]``."""
    pairs = materialize_bwd_triton(grad, a, b, scale, _split_config(config)[1], via_inductor, _poison(config))
    return [g for pair in pairs for g in pair]


def _fwd_fake(a, b, scale, config):
    return [a_p.new_empty((a_p.shape[0], a_p.shape[1], a_p.shape[3], b_p.shape[3])) for a_p, b_p in zip(a, b)]


def _bwd_fake(grad, a, b, scale, config):
    return [g for a_p, b_p in zip(a, b) for g in (a_p.new_empty(a_p.shape), b_p.new_empty(b_p.shape, dtype=a_p.dtype))]


def _setup_context(ctx, inputs, output):
    a, b, scale, config = inputs
    ctx.save_for_backward(*a, *b)
    ctx.parts, ctx.scale, ctx.config = len(a), scale, config


def _autograd_backward(backward_op):
    def backward(ctx, grads):
        saved = ctx.saved_tensors
        a, b = list(saved[: ctx.parts]), list(saved[ctx.parts :])
        grads = [  # an output that took no part in the loss has no gradient
            g if g is not None else a_p.new_zeros((a_p.shape[0], a_p.shape[1], a_p.shape[3], b_p.shape[3]))
            for g, a_p, b_p in zip(grads, a, b)
        ]
        flat = backward_op(grads, a, b, ctx.scale, ctx.config)
        return list(flat[0::2]), list(flat[1::2]), None, None

    return backward


@torch.library.custom_op("tpa::materialize", mutates_args=())
def _materialize_op(
    a: list[torch.Tensor], b: list[torch.Tensor], scale: list[float], config: list[int]
) -> list[torch.Tensor]:
    return _fwd_impl(a, b, scale, config)


@torch.library.custom_op("tpa::materialize_backward", mutates_args=())
def _materialize_backward_op(
    grad: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scale: list[float], config: list[int]
) -> list[torch.Tensor]:
    return _bwd_impl(grad, a, b, scale, config)


_materialize_op.register_fake(_fwd_fake)
_materialize_backward_op.register_fake(_bwd_fake)
_materialize_op.register_autograd(_autograd_backward(_materialize_backward_op), setup_context=_setup_context)


def _register_triton_ops():
    """``tpa::materialize_triton`` and its backward (at import, when triton is installed: torch.compile
    must find them registered, it cannot register an op while tracing)."""
    from torch.library import triton_op

    @triton_op("tpa::materialize_triton", mutates_args=())
    def forward(a: list[torch.Tensor], b: list[torch.Tensor], scale: list[float], config: list[int]) -> list[torch.Tensor]:
        return _fwd_impl(a, b, scale, config, via_inductor=True)

    @triton_op("tpa::materialize_triton_backward", mutates_args=())
    def backward(
        grad: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], scale: list[float], config: list[int]
    ) -> list[torch.Tensor]:
        return _bwd_impl(grad, a, b, scale, config, via_inductor=True)

    forward.register_autograd(_autograd_backward(backward), setup_context=_setup_context)
    return forward, backward


_TRITON_OPS = _register_triton_ops() if HAVE_TRITON else None


def _op_for(device_type: str, registration: str):
    """The registration a call takes (:attr:`MaterializeLaunchOptions.registration`)."""
    use_triton_op = registration == "triton_op" or (registration == "auto" and device_type == "cuda")
    return _TRITON_OPS[0] if use_triton_op else _materialize_op


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check(a: torch.Tensor, b: torch.Tensor, where: str = "") -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tpa_materialize: {name}{where} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"tpa_materialize: {name}{where} must have 4 dimensions [B, T, R, X], got shape {tuple(t.shape)}"
            )
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(
            f"tpa_materialize: a{where} {tuple(a.shape)} = [B, T, R, H] and b{where} {tuple(b.shape)} = [B, T, R, D] "
            "must agree in B, T and R"
        )
    if a.shape[2] < 1:
        raise ValueError(f"tpa_materialize: the rank R{where} must be >= 1")
    if a.device != b.device:
        raise ValueError(f"tpa_materialize: a{where} is on {a.device}, b{where} on {b.device}; both must share a device")
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"tpa_materialize: {name}{where} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )


def tpa_materialize_many(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scales: Sequence[float | None] | None = None,
    backend: str = "auto",
    fwd_config: MaterializeConfig | None = None,
    bwd_config: MaterializeConfig | None = None,
    options: MaterializeLaunchOptions | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`tpa_materialize` of several factor pairs (Q, K and V of a layer) in one op call: one
    kernel launch for up to three pairs each way, where separate calls cost a launch and an op
    dispatch each (the host time that bounds a training step at the ``small`` size).

    Args:
        pairs: ``[(a_0, b_0), (a_1, b_1), ...]``, each as in :func:`tpa_materialize`. The pairs share
            the head count H, the dtype and the device; batch, length, rank and feature size may differ.
        scales: one per pair, ``None`` for ``1/R``; default all ``None``.
        backend, fwd_config, bwd_config, options: as in :func:`tpa_materialize` (one launch
            configuration, chosen for the largest feature size); the auto backend takes the Triton
            op only when every pair is in its range.

    Returns:
        one ``[B_p, T_p, H, D_p]`` tensor per pair.

    Raises:
        TypeError, ValueError: as :func:`tpa_materialize`, naming the pair; pairs that differ in
        H, dtype or device; no pairs; a wrong number of scales.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"tpa_materialize: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("tpa_materialize_many: expected at least one (a, b) pair")
    scales = [None] * len(pairs) if scales is None else list(scales)
    if len(scales) != len(pairs):
        raise ValueError(f"tpa_materialize_many: {len(scales)} scales for {len(pairs)} pairs")
    many = len(pairs) > 1
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"tpa_materialize_many: pair {i} must be an (a, b) tuple")
        _check(*pair, f" (pair {i})" if many else "")
    a0 = pairs[0][0]
    device_type = a0.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast treats einsum: float64 stays, the rest is cast
        dtype = torch.get_autocast_dtype(device_type)
        pairs = [tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in pair) for pair in pairs]
    for i, (a, b) in enumerate(pairs):
        where = f" (pair {i})" if many else ""
        if a.dtype != b.dtype:
            raise TypeError(f"tpa_materialize: a{where} ({a.dtype}) and b{where} ({b.dtype}) must share one dtype")
        if (a.dtype, a.device, a.shape[3]) != (pairs[0][0].dtype, pairs[0][0].device, pairs[0][0].shape[3]):
            raise ValueError(
                f"tpa_materialize_many: pair {i} ({a.dtype}, {a.device}, H={a.shape[3]}) differs from pair 0 "
                f"({pairs[0][0].dtype}, {pairs[0][0].device}, H={pairs[0][0].shape[3]}); pairs share dtype, device and H"
            )
    heads = a0.shape[3]
    ranks = [a.shape[2] for a, _ in pairs]
    dims = [b.shape[3] for _, b in pairs]
    if backend == "auto":
        use_triton = (
            device_type == "cuda" and HAVE_TRITON and max(ranks) <= _AUTO_MAX["rank"]
            and max(dims) <= _AUTO_MAX["feature"] and heads <= _AUTO_MAX["heads"]
        )
    elif backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("tpa_materialize: backend='triton' needs the triton package")
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"tpa_materialize: backend='triton' runs on CUDA (or CPU via the interpreter), not {a0.device}")
        use_triton = True
    else:
        use_triton = False
    if not use_triton:
        return tuple(materialize_reference(a, b, scale=s) for (a, b), s in zip(pairs, scales))
    scales = [float(1.0 / r if s is None else s) for r, s in zip(ranks, scales)]
    options = DEFAULT_LAUNCH_OPTIONS if options is None else options
    fwd_default, bwd_default = default_configs(heads, max(dims), pairs[0][0].dtype, options.heuristic)
    config = (fwd_config or fwd_default).as_list() + (bwd_config or bwd_default).as_list() + [int(options.poison_buffers)]
    op = _op_for(device_type, options.registration)
    outs = []
    for i in range(0, len(pairs), _MAX_PARTS):
        group = pairs[i : i + _MAX_PARTS]
        outs.extend(op([a for a, _ in group], [b for _, b in group], scales[i : i + _MAX_PARTS], config))
    return tuple(outs)


def tpa_materialize(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    fwd_config: MaterializeConfig | None = None,
    bwd_config: MaterializeConfig | None = None,
    options: MaterializeLaunchOptions | None = None,
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
        options: optional :class:`MaterializeLaunchOptions` (heuristic constants, registration,
            test hooks); default :data:`DEFAULT_LAUNCH_OPTIONS`.

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
    return tpa_materialize_many([(a, b)], [scale], backend, fwd_config, bwd_config, options)[0]
