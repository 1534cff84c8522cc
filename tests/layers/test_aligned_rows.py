"""The static decode step's projection into rows padded to 8 elements (tpa.layers.base) is the plain
linear layer's result, as a view; wrapped or gradient-needing layers are called as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tpa.layers.base import ROW_ALIGN, linear_aligned_rows, mm_into_aligned_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("lead, n", [((8, 1), 980), ((3, 1), 77), ((1, 1), 1), ((5,), 16)])
def test_aligned_rows_hold_the_linear_result(lead, n):
    gen = torch.Generator().manual_seed(n)
    linear = nn.Linear(48, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, 48, generator=gen))
    x = torch.randn(*lead, 48, generator=gen)
    out = mm_into_aligned_rows(x, linear.weight.detach())
    assert out.shape == (*lead, n) and out.stride(-1) == 1
    rows = out.reshape(-1, n).shape[0]
    assert out.untyped_storage().nbytes() == rows * -(-n // ROW_ALIGN) * ROW_ALIGN * out.element_size()
    if rows > 1:
        assert out.reshape(-1, n).stride(0) % ROW_ALIGN == 0
    torch.testing.assert_close(out, linear(x).detach(), rtol=1e-6, atol=1e-5)


def test_wrapped_or_differentiated_layers_are_called_as_they_are():
    x = torch.randn(2, 1, 8, device=DEVICE)
    calls = []
    hooked = nn.Linear(8, 10, bias=False).to(DEVICE)
    hooked.register_forward_hook(lambda module, args, out: calls.append(1))
    linear_aligned_rows(hooked, x)
    assert calls == [1]
    biased = nn.Linear(8, 10).to(DEVICE)
    torch.testing.assert_close(linear_aligned_rows(biased, x), biased(x))
    plain = nn.Linear(8, 10, bias=False).to(DEVICE)
    out = linear_aligned_rows(plain, x)  # gradients on: the plain call, which autograd can follow
    assert out.requires_grad and out.is_contiguous()


@pytest.mark.gpu
def test_aligned_rows_on_cuda():
    """``pytest -m gpu``: without gradients a plain layer's CUDA output has aligned rows and equal values."""
    linear = nn.Linear(768, 980, bias=False).cuda().bfloat16()
    x = torch.randn(8, 1, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = linear_aligned_rows(linear, x)
        expected = linear(x)
    assert out.reshape(-1, 980).stride(0) == 984
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
