"""Rotary position embedding (RoPE, Su et al. 2021).

Pairs are split in halves (dimension ``i`` rotates with ``i + dim/2``), the convention of LLaMA
in transformers; it is the paper's block-diagonal ``R_t`` up to a fixed permutation of features,
so every identity of the paper (Theorem 3.1, Theorem C.1) holds unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_TABLES = ("cos_table", "sin_table")


class RotaryEmbedding(nn.Module):
    """``cos``/``sin`` of integer positions, gathered from tables computed once.

    The tables ``cos_table``, ``sin_table [max_positions, dim/2]`` are float32, their angles formed
    in float64 and rounded once, so long positions keep full precision. They are non-persistent
    buffers (never in a checkpoint; rebuilt by :meth:`reset_tables` after loading) that keep float32
    whatever the model's dtype: ``model.to(torch.bfloat16)``, ``.half()``, ``.double()`` move them to
    the new device and rebuild them in float32 (see :meth:`_apply`). A forward only gathers rows, so
    no sine or cosine is evaluated per call, per layer or inside a compiled graph.

    Args:
        dim: rotated feature size (even).
        theta: base of the geometric frequency ladder.
        max_positions: rows of the tables; positions must lie in ``[0, max_positions)``.
    """

    def __init__(self, dim: int, theta: float = 10000.0, max_positions: int = 2048):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RoPE dimension must be a positive even number, got {dim}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.dim = dim
        self.theta = theta
        self.max_positions = max_positions
        for name in _TABLES:
            self.register_buffer(name, torch.empty(max_positions, dim // 2, dtype=torch.float32), persistent=False)
        self.reset_tables()

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions [...]`` -> float64 angles ``[..., dim/2]`` (position times each frequency)."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        return positions.to(torch.float64)[..., None] * inv_freq

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute both tables in float32 on their current device (a no-op on the meta device)."""
        device = self.cos_table.device
        angles = self.angles(torch.arange(self.max_positions, device=device))
        self.cos_table = angles.cos().to(torch.float32)
        self.sin_table = angles.sin().to(torch.float32)

    def _apply(self, fn, recurse=True):
        # nn.Module.to / half / bfloat16 / double / to_empty / cuda go through here: let them move the
        # tables (or cast them), then rebuild any table they replaced, in float32 on its new device
        before = [getattr(self, name) for name in _TABLES]
        super()._apply(fn, recurse)
        after = [getattr(self, name) for name in _TABLES]
        if any(a is not b for a, b in zip(after, before)):
            self.reset_tables()  # on the device of cos_table; both tables always share one
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``positions [B, T]`` integers in ``[0, max_positions)``.

        Returns ``cos, sin`` of shape ``[B, T, dim/2]`` in ``dtype``: rows of the float32 tables, or, for
        ``dtype=torch.float64`` (exact references in tests), formed directly in float64 at any position.
        A position outside the table fails in the lookup (``IndexError`` on a CPU, a device-side assert
        on a GPU); the model checks explicit ``position_ids`` before it gets here.
        """
        if dtype == torch.float64:
            angles = self.angles(positions)
            return angles.cos(), angles.sin()
        cos, sin = self.cos_table, self.sin_table
        if cos.device != positions.device:  # a stand-alone module used on another device than its tables
            cos, sin = cos.to(positions.device), sin.to(positions.device)
        # an embedding lookup: an index outside the table (negative ones too) fails, it never wraps around
        return F.embedding(positions, cos).to(dtype), F.embedding(positions, sin).to(dtype)


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


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``2 * cos.shape[-1]`` features of ``x [B, T, *, D]``; the rest pass unchanged."""
    rotated = 2 * cos.shape[-1]
    if rotated == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    head, tail = x.split([rotated, x.shape[-1] - rotated], dim=-1)
    return torch.cat([apply_rotary(head, cos, sin), tail], dim=-1)
