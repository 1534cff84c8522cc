"""The residual add and RMSNorm in one launch (tpa.ops.add_norm) against its twin, and the twin against
the model's own RMSNorm module.

The sum is rounded once to the dtype in both, so it is compared exactly; the norm accumulates its
mean square in float32 in a different order than torch's kernel and may differ by one rounding of
the dtype. Shapes are awkward on purpose: widths 1, 77 and 1000 (not powers of two), one to nine
rows, strided rows, no delta.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.ops.kernels import DEVICE, rerun_with_interpreter, skip_unless_kernels
from tpa.modules import RMSNorm
from tpa.ops.add_norm import add_rms_norm, add_rms_norm_reference

needs_kernel = skip_unless_kernels("test_add_norm_in_fresh_process")

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}

CASES = [  # leading shape, width, dtype, with delta, strided rows
    ((8, 1), 768, torch.bfloat16, True, False),
    ((3, 5), 77, torch.float16, True, True),
    ((9,), 1000, torch.float32, True, False),
    ((2, 1), 768, torch.bfloat16, False, True),
    ((1, 1), 1, torch.float32, True, False),
]


def _inputs(lead, width, dtype, with_delta, strided):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((lead, width, str(dtype), with_delta, strided)).encode()))
    x = (torch.randn(*lead, width + 3, generator=gen) * 3)[..., 1: 1 + width] if strided else \
        torch.randn(*lead, width, generator=gen) * 3
    delta = torch.randn(*lead, width, generator=gen) if with_delta else None
    weight = 1 + 0.5 * torch.randn(width, generator=gen)
    move = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return move(x), move(delta), move(weight)


@needs_kernel
@pytest.mark.parametrize("lead, width, dtype, with_delta, strided", CASES)
def test_kernel_matches_twin(lead, width, dtype, with_delta, strided):
    x, delta, weight = _inputs(lead, width, dtype, with_delta, strided)
    x_before = x.clone()
    total_k, out_k = add_rms_norm(x, delta, weight, 1e-5, backend="triton")
    total_r, out_r = add_rms_norm_reference(x, delta, weight, 1e-5)
    assert torch.equal(x, x_before), "the residual input was written"
    assert out_k.shape == x.shape and out_k.dtype == dtype and total_k.shape == x.shape
    assert torch.equal(total_k, total_r)
    torch.testing.assert_close(out_k, out_r, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_twin_is_the_norm_module_of_the_sum(dtype):
    gen = torch.Generator().manual_seed(5)
    norm = RMSNorm(33, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(33, generator=gen))
    x, delta = (torch.randn(2, 3, 33, generator=gen).to(dtype) for _ in range(2))
    total, out = norm.add_and_norm(x, delta, backend="reference")
    assert torch.equal(total, x + delta) and torch.equal(out, norm(x + delta))
    same, out_alone = norm.add_and_norm(x, None, backend="reference")
    assert same is x and torch.equal(out_alone, norm(x))


def test_a_norm_with_hooks_runs_as_a_module():
    """Tensor parallelism replicates norms through forward hooks: add_and_norm must run them."""
    norm = RMSNorm(8)
    seen = []
    norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    x = torch.randn(2, 8)
    total, out = norm.add_and_norm(x, torch.ones(2, 8), backend="triton")
    assert seen == [(2, 8)] and torch.equal(total, x + 1) and torch.equal(out, norm(x + 1))


def test_the_kernel_is_not_used_where_a_gradient_is_needed():
    x = torch.randn(3, 16, requires_grad=True)
    weight = torch.ones(16, requires_grad=True)
    total, out = add_rms_norm(x, torch.randn(3, 16), weight, 1e-6, backend="triton")
    out.sum().backward()
    assert x.grad is not None and weight.grad is not None


@pytest.mark.parametrize("x, delta, weight, message", [
    (torch.zeros(2, 8), None, torch.ones(7), "x must be \\[..., C\\] and weight \\[C\\]"),
    (torch.zeros(2, 8), torch.zeros(2, 7), torch.ones(8), "delta must match x"),
    (torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float64), torch.ones(8), "delta must match x"),
    (torch.zeros(2, 8), None, torch.ones(1, 8), "weight \\[C\\]"),
])
def test_bad_inputs_say_what_was_expected(x, delta, weight, message):
    with pytest.raises(ValueError, match=message):
        add_rms_norm(x, delta, weight, 1e-6, backend="reference")


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'reference'"):
        add_rms_norm(torch.zeros(1, 4), None, torch.ones(4), 1e-6, backend="fused")


@needs_kernel
def test_the_kernel_refuses_float64():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        add_rms_norm(torch.zeros(1, 4, dtype=torch.float64, device=DEVICE), None,
                     torch.ones(4, dtype=torch.float64, device=DEVICE), 1e-6, backend="triton")


@pytest.mark.gpu
def test_compiled_kernel_matches_twin_on_gpu():
    """``pytest -m gpu``: every case above with the kernel compiled."""
    for case in CASES:
        test_kernel_matches_twin(*case)


def test_add_norm_in_fresh_process():
    rerun_with_interpreter(__file__, "kernel")
