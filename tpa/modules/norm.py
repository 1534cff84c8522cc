"""Root-mean-square layer normalisation (Zhang & Sennrich, 2019), as in LLaMA."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / rms(x) * weight``, computed in float32 (float64 for float64 input) and cast back to the input dtype.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:  # the fused CUDA kernel accumulates in float32
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        work = torch.promote_types(x.dtype, torch.float32)
        return torch.nn.functional.rms_norm(x.to(work), (x.shape[-1],), self.weight.to(work), self.eps).to(x.dtype)
