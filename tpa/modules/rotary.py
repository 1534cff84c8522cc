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
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``positions [B, T]`` integers. Returns ``cos, sin`` of shape ``[B, T, dim/2]`` in float32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by position.

    Args:
        x: ``[B, T, *, dim]``; any number of middle dimensions (ranks, heads) share the rotation.
        cos, sin: ``[B, T, dim/2]`` from :class:`RotaryEmbedding`.

    Returns:
        ``x`` rotated, same shape and dtype (computed in float32).
    """
    extra = x.dim() - cos.dim()
    shape = cos.shape[:2] + (1,) * extra + cos.shape[2:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
