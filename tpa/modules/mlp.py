"""SwiGLU feed-forward network (Shazeer, 2020), as used by LLaMA and T6 (paper Section 4.3)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tpa.ops.swiglu import silu_mul


class SwiGLU(nn.Module):
    """``FFN(x) = (SiLU(x W1) * (x W2)) W3``.

    ``W1`` and ``W2`` are fused into one ``gate_up_proj`` weight ``[2 * intermediate, hidden]``.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: inner width.

    Shapes: ``[..., C] -> [..., C]``.

    ``forward(x, fused_backend=None)``: with a backend (``"auto"``, ``"triton"``, ``"reference"``), the
    activation ``silu(gate) * up`` is one launch (:func:`tpa.ops.swiglu.silu_mul`), as the model's
    static one-token step asks; the numbers are those of the two torch ops.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fused_backend: str | None = None) -> torch.Tensor:
        if fused_backend is not None:
            return self.down_proj(silu_mul(self.gate_up_proj(x), backend=fused_backend))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)
