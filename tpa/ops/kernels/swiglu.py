"""SwiGLU's activation, ``silu(gate) * up``, in one launch (host side: :mod:`tpa.ops.swiglu`).

Imported only where Triton is installed, on the first call of the Triton path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpa.ops.kernels.common import round_bf16

__all__ = ["silu_mul_kernel"]


@triton.jit
def silu_mul_kernel(GATE_UP, OUT, s_in, s_out, WIDTH, BLOCK: tl.constexpr, FIX_BF16: tl.constexpr):
    """Grid ``(rows, cdiv(WIDTH, BLOCK))``. ``GATE_UP [rows, 2 * WIDTH]`` (row stride ``s_in``) holds the
    gate then the up projection; ``OUT [rows, WIDTH]`` (row stride ``s_out``) gets ``silu(gate) * up``,
    rounded to the storage dtype after the SiLU and after the product, as torch's two ops round."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < WIDTH
    gate = tl.load(GATE_UP + row * s_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * s_in + WIDTH + cols, mask=ok, other=0.0)
    dtype = OUT.dtype.element_ty
    act = round_bf16(gate / (1.0 + tl.exp(-gate)), FIX_BF16).to(dtype).to(tl.float32)
    out = round_bf16(act * up.to(tl.float32), FIX_BF16).to(dtype)
    tl.store(OUT + row * s_out + cols, out, mask=ok)
