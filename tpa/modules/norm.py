"""Root-mean-square layer normalisation (Zhang & Sennrich, 2019), as in LLaMA."""

from __future__ import annotations

import torch
from torch import nn

from tpa.ops.add_norm import add_rms_norm, rms_norm


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
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor | None, *,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, self(x + delta))`` (``delta`` None: ``(x, self(x))``), on CUDA in one launch
        (:func:`tpa.ops.add_norm.add_rms_norm`; ``backend`` as there). A module with forward hooks
        (tensor parallelism's replicated norms, for one) is called as a module, so that they run."""
        if self._forward_hooks or self._forward_pre_hooks or type(self.weight) is not nn.Parameter:
            total = x if delta is None else x + delta
            return total, self(total)
        return add_rms_norm(x, delta, self.weight, self.eps, backend=backend)
