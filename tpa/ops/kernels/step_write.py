"""The one-token decode step's RoPE and cache write in one launch (host side: :mod:`tpa.ops.step_write`).

One program per (sequence, segment) of the projection output row: segment 0 is the query part,
rotated (its leading ``2 * HALF`` features of every row) and stored to a fresh tensor; segments 1 to
``NUM_WRITES`` are cache parts, rotated or copied, stored at the sequence's slot of their cache
buffer. Rotation is computed in float32, as :func:`tpa.modules.rotary.apply_rotary` does.

Imported only where Triton is installed, on the first call of the Triton path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpa.ops.kernels.common import round_bf16

__all__ = ["step_write_kernel"]


@triton.jit
def _rows_to(src, dst, dst_row_stride, cos, sin,
             ROWS: tl.constexpr, WIDTH: tl.constexpr, HALF: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, FIX_BF16: tl.constexpr):
    """``ROWS x WIDTH`` contiguous values at ``src`` -> rows ``dst_row_stride`` apart at ``dst``,
    the first ``2 * HALF`` features of each row rotated by ``cos``/``sin [HALF]`` (none for HALF 0)."""
    rows = tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < ROWS) & (cols < WIDTH)
    x = tl.load(src + rows * WIDTH + cols, mask=inside, other=0.0)
    if HALF > 0:
        first = cols < HALF
        rotated = cols < 2 * HALF
        partner = tl.where(first, cols + HALF, cols - HALF)
        other = tl.load(src + rows * WIDTH + partner, mask=inside & rotated, other=0.0).to(tl.float32)
        freq = tl.where(first, cols, cols - HALF)
        c = tl.load(cos + freq, mask=rotated, other=1.0)
        s = tl.load(sin + freq, mask=rotated, other=0.0)
        xf = x.to(tl.float32)
        turned = tl.where(first, xf * c - other * s, xf * c + other * s)
        turned = round_bf16(turned, FIX_BF16)
        x = tl.where(rotated, turned, xf).to(dst.dtype.element_ty)
    tl.store(dst + rows * dst_row_stride + cols, x, mask=inside)


@triton.jit
def step_write_kernel(
    Y, s_y, COS, SIN, s_cs, SLOTS, Q_OUT,
    C1, s1_b, s1_m, s1_r, C2, s2_b, s2_m, s2_r, C3, s3_b, s3_m, s3_r, C4, s4_b, s4_m, s4_r,
    Q_OFF: tl.constexpr, Q_ROWS: tl.constexpr, Q_WIDTH: tl.constexpr, Q_BR: tl.constexpr, Q_BW: tl.constexpr,
    O1: tl.constexpr, R1: tl.constexpr, W1: tl.constexpr, H1: tl.constexpr, BR1: tl.constexpr, BW1: tl.constexpr,
    O2: tl.constexpr, R2: tl.constexpr, W2: tl.constexpr, H2: tl.constexpr, BR2: tl.constexpr, BW2: tl.constexpr,
    O3: tl.constexpr, R3: tl.constexpr, W3: tl.constexpr, H3: tl.constexpr, BR3: tl.constexpr, BW3: tl.constexpr,
    O4: tl.constexpr, R4: tl.constexpr, W4: tl.constexpr, H4: tl.constexpr, BR4: tl.constexpr, BW4: tl.constexpr,
    HALF: tl.constexpr, NUM_WRITES: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """Grid ``(B, 1 + NUM_WRITES)``. ``Y [B, P]`` (row stride ``s_y``), ``COS``/``SIN [B, HALF]``
    (row stride ``s_cs``), ``SLOTS [B]`` int64, ``Q_OUT [B, Q_ROWS, Q_WIDTH]`` contiguous; cache ``k``
    is ``Ck [B, capacity, Rk, Wk]`` with strides ``sk_b, sk_m, sk_r`` (unit feature stride), filled
    from ``Y[:, Ok : Ok + Rk * Wk]``, its rows rotated when ``Hk`` is ``HALF`` (copied when 0)."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    src = Y + b.to(tl.int64) * s_y
    cos = COS + b * s_cs
    sin = SIN + b * s_cs
    slot = tl.load(SLOTS + b)
    if part == 0:
        _rows_to(src + Q_OFF, Q_OUT + b.to(tl.int64) * (Q_ROWS * Q_WIDTH), Q_WIDTH, cos, sin,
                 Q_ROWS, Q_WIDTH, HALF, Q_BR, Q_BW, FIX_BF16)
    if part == 1:
        _rows_to(src + O1, C1 + b.to(tl.int64) * s1_b + slot * s1_m, s1_r, cos, sin, R1, W1, H1, BR1, BW1, FIX_BF16)
    if NUM_WRITES >= 2:
        if part == 2:
            _rows_to(src + O2, C2 + b.to(tl.int64) * s2_b + slot * s2_m, s2_r, cos, sin, R2, W2, H2, BR2, BW2,
                     FIX_BF16)
    if NUM_WRITES >= 3:
        if part == 3:
            _rows_to(src + O3, C3 + b.to(tl.int64) * s3_b + slot * s3_m, s3_r, cos, sin, R3, W3, H3, BR3, BW3,
                     FIX_BF16)
    if NUM_WRITES >= 4:
        if part == 4:
            _rows_to(src + O4, C4 + b.to(tl.int64) * s4_b + slot * s4_m, s4_r, cos, sin, R4, W4, H4, BR4, BW4,
                     FIX_BF16)
