"""Rotary position embedding (RoPE, Su et al. 2021).

Pairs are split in halves (dimension ``i`` rotates with ``i + dim/2``), the convention of LLaMA
in transformers; it is the paper's block-diagonal ``R_t`` up to a fixed permutation of features,
so every identity of the paper (Theorem 3.1, Theorem C.1) holds unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces ``cos``/``sin`` tables for integer positions.

    Args:
        dim: rotated feature size (even).
        theta: base of the geometric frequency ladder.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RoPE dimension must be a positive even number, got {dim}")
        self.dim = dim
        self.theta = theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``positions [B, T]`` integers. Returns ``cos, sin`` of shape ``[B, T, dim/2]`` in ``dtype``.

        Angles are formed in float64 (the tables are small), so long positions keep full precision.
        """
        # computed here rather than kept as a buffer, so that model.to(bfloat16) cannot degrade it
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = positions.to(torch.float64)[..., None] * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by position.

    Args:
        x: ``[B, T, *, dim]``; any number of middle dimensions (ranks, heads) share the rotation.
        cos, sin: ``[B, T, dim/2]`` from :class:`RotaryEmbedding`.

    Returns:
        ``x`` rotated, same shape and dtype (computed in float32, or float64 for float64 input).
    """
    extra = x.dim() - cos.dim()
    shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(work), sin.to(work)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
