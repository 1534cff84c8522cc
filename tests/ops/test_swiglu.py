"""SwiGLU's activation in one launch (tpa.ops.swiglu) against its twin, and the twin against the
SwiGLU module's own ops.

Both round after the SiLU and after the product; the kernel's exponential may differ from torch's by
an ulp of float32 before the rounding, so results agree to one rounding of the dtype. Widths 1, 77
and 2048 (one and several column blocks), rows 1 to 9, a strided input.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.ops.kernels import DEVICE, rerun_with_interpreter, skip_unless_kernels
from tpa.modules import SwiGLU
from tpa.ops.swiglu import silu_mul, silu_mul_reference

needs_kernel = skip_unless_kernels("test_swiglu_in_fresh_process")

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}

CASES = [  # leading shape, width I, dtype, strided rows
    ((8, 1), 2048, torch.bfloat16, False),
    ((3, 3), 77, torch.float16, True),
    ((9,), 1500, torch.float32, False),
    ((1, 1), 1, torch.float32, True),
]


@needs_kernel
@pytest.mark.parametrize("lead, width, dtype, strided", CASES)
def test_kernel_matches_twin(lead, width, dtype, strided):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((lead, width, str(dtype), strided)).encode()))
    full = torch.randn(*lead, 2 * width + 4, generator=gen) * 4
    gate_up = (full[..., 2: 2 + 2 * width] if strided else full[..., : 2 * width].contiguous()).to(dtype).to(DEVICE)
    out = silu_mul(gate_up, backend="triton")
    assert out.shape == (*lead, width) and out.dtype == dtype
    torch.testing.assert_close(out, silu_mul_reference(gate_up), rtol=TOL[dtype], atol=TOL[dtype])


def test_twin_is_the_module_activation():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        assert torch.equal(mlp(x, fused_backend="reference"), mlp(x))


def test_the_kernel_is_not_used_where_a_gradient_is_needed():
    gate_up = torch.randn(2, 8, requires_grad=True)
    silu_mul(gate_up, backend="triton").sum().backward()
    assert gate_up.grad is not None


def test_bad_inputs_say_what_was_expected():
    with pytest.raises(ValueError, match="gate_up must be \\[..., 2 \\* I\\]"):
        silu_mul(torch.zeros(2, 7), backend="reference")
    with pytest.raises(ValueError, match="backend must be"):
        silu_mul(torch.zeros(2, 8), backend="fused")


@pytest.mark.gpu
def test_compiled_kernel_matches_twin_on_gpu():
    """``pytest -m gpu``: every case above with the kernel compiled."""
    for case in CASES:
        test_kernel_matches_twin(*case)


def test_swiglu_in_fresh_process():
    rerun_with_interpreter(__file__, "kernel")
