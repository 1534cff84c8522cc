"""A residual add and the RMSNorm after it, in one launch (host side: :mod:`tpa.ops.add_norm`).

Imported only where Triton is installed, on the first call of the Triton path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpa.ops.kernels.common import round_bf16

__all__ = ["add_rms_norm_kernel"]


@triton.jit
def add_rms_norm_kernel(
    X, DELTA, W, SUM, OUT, s_x, s_d, s_s, s_o, C, eps,
    HAS_DELTA: tl.constexpr, BLOCK_C: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """One program per row of ``C`` features. ``X``, ``DELTA`` (when ``HAS_DELTA``), ``SUM`` and ``OUT``
    are ``[rows, C]`` with row strides ``s_x``, ``s_d``, ``s_s``, ``s_o`` (unit feature stride), ``W [C]``.
    ``SUM = X + DELTA`` rounded to the storage dtype, as torch's add does; ``OUT = SUM * rsqrt(mean(SUM^2) + eps)
    * W`` in float32, rounded once (torch's ``rms_norm``)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * s_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(DELTA + row * s_d + cols, mask=ok, other=0.0)
        x = round_bf16(x.to(tl.float32) + d.to(tl.float32), FIX_BF16).to(SUM.dtype.element_ty)
        tl.store(SUM + row * s_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    eps = tl.cast(eps, tl.float32)  # fp64 when inductor launches the kernel
    mean_square = tl.sum(xf * xf, axis=0) / C
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    y = xf * tl.math.rsqrt(mean_square + eps) * w
    tl.store(OUT + row * s_o + cols, round_bf16(y, FIX_BF16).to(OUT.dtype.element_ty), mask=ok)
