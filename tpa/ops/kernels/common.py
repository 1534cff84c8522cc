"""Triton helpers the kernels share (imported only where Triton is installed)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_bf16(x, FIX: tl.constexpr):
    """Round float32 ``x`` to the nearest bfloat16 value (ties to even), kept in float32, when FIX.

    Only for Triton's interpreter, whose float32 -> bfloat16 cast truncates; compiled code rounds to
    nearest even in the cast itself (FIX is False there), so both give the same numbers."""
    if FIX:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x
