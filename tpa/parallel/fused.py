"""Fused projections under tensor parallelism: each rank holds only the rows it computes.

TPA's ``proj``, MHA's ``qkv_proj`` and SwiGLU's ``gate_up_proj`` stack rows of several kinds in one
weight ``[S, C]`` (the single-process layout). A contiguous split of its rows (``ColwiseParallel``)
would cut across those kinds, so under TP the weight is held as one parameter per segment:

- a **head segment** (rows that belong to one head: TPA's query, gate and head factors A, MHA's
  query heads and, where N divides them, its K/V heads, the SwiGLU gate and up halves) is a
  ``Shard(0)`` DTensor of its rows ``[heads * inner, C]`` (head-major rows, as a query's ``[H, D]``) or
  ``[heads, inner, C]`` (TPA's rank-major head factors ``A [R, H]``, transposed): each rank holds
  ``heads / N`` heads of it;
- a **shared segment** (rows every rank needs: TPA's feature factors B and C, MHA's K/V heads when
  they are fewer than the ranks) is a ``Replicate`` DTensor ``[rows, C]``, or with ``shard_shared``
  a ``Shard(0)`` one that each use all-gathers (FSDP-style, within the TP group).

Per-rank parameter memory of a fused weight is thus ``(head rows) / N + (shared rows)`` rows instead
of ``S``, or ``S / N`` with ``shard_shared``. The segments' global layout does not depend on N, and
:mod:`tpa.parallel.state_dict` presents all segments of a fused weight to DCP as the one single-process ``[S, C]`` tensor, so a
checkpoint written under TP loads under any TP size or none.

Shapes: ``forward(x [..., C]) -> [..., local rows]``, rows in the order of the segments, each
segment's rows in the single-process order restricted to this rank's heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.nn import functional as F

from tpa.parallel.comm import gather_rows, sum_gradients

__all__ = ["Segment", "ShardedFusedLinear"]


@dataclass(frozen=True)
class Segment:
    """Rows ``[offset, offset + heads * inner)`` of a fused weight.

    ``head_major``: row ``offset + h * inner + i`` belongs to head ``h`` (a query ``[H, D]``); else row
    ``offset + i * heads + h`` does (a TPA head factor ``[R, H]``, rank-major). ``sharded``: split over
    the ranks by heads; else every rank computes ``rows`` of them (all by default), from the whole
    segment that it holds or, ``gathered``, all-gathers from the ranks' ``1/N`` of it at each use.
    """

    name: str
    offset: int
    heads: int
    inner: int
    head_major: bool = True
    sharded: bool = True
    rows: tuple[int, int] | None = None
    gathered: bool = False

    @property
    def size(self) -> int:
        return self.heads * self.inner

    def stored(self, plain: torch.Tensor) -> torch.Tensor:
        """This segment of the single-process weight ``plain [S, C]`` in its stored layout: its rows
        ``[heads * inner, C]``, or ``[heads, inner, C]`` for a rank-major one (so that a split of dim 0
        splits heads)."""
        block = plain[self.offset:self.offset + self.size]
        if self.head_major:
            return block
        return block.reshape(self.inner, self.heads, -1).transpose(0, 1)

    def plain_rows(self, local: torch.Tensor, offset: tuple[int, ...]) -> list[tuple[int, torch.Tensor]]:
        """``(first row in the single-process weight, view [rows, C] of local)`` for a block ``local`` of
        the stored segment that starts at ``offset`` (in the stored layout); views share ``local``'s memory."""
        if local.shape[0] == 0:
            return []
        if self.head_major:
            return [(self.offset + offset[0], local)]
        if offset[1] != 0 or local.shape[1] != self.inner:
            raise ValueError(f"segment {self.name}: a block split inside a head ({tuple(local.shape)} at {offset})")
        h0 = offset[0]
        return [(self.offset + i * self.heads + h0, local[:, i]) for i in range(self.inner)]


class ShardedFusedLinear(nn.Module):
    """A bias-free fused projection whose rows are held segment by segment (see the module docstring).

    ``weight_<name>``: the parameter of each segment; ``segments``: their :class:`Segment` in order;
    ``out_features``/``in_features``: the single-process weight's shape. ``shard_shared``: hold the
    shared segments ``1/N`` per rank too (``Shard(0)``) and all-gather them at each use (their gradient
    reduce-scattered instead of all-reduced: the same traffic in a training step, but one all-gather of
    those rows per forward in decoding); a shared segment of rows that N does not divide stays whole.
    """

    def __init__(self, linear: nn.Linear, segments: list[Segment], mesh: DeviceMesh, shard_shared: bool = False):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ShardedFusedLinear expects a projection without bias")
        self.out_features, self.in_features = linear.weight.shape
        if sum(s.size for s in segments) != self.out_features:
            raise AssertionError("the segments must cover the fused weight")
        n = mesh.size()
        segments = [replace(s, gathered=True) if shard_shared and not s.sharded and s.size % n == 0 else s
                    for s in segments]
        self.segments = segments
        self.group = mesh.get_group()
        plain = linear.weight.detach()
        for seg in segments:
            if seg.sharded and seg.heads % n:
                raise ValueError(f"segment {seg.name}: {seg.heads} heads do not split over {n} ranks")
            placement = Shard(0) if seg.sharded or seg.gathered else Replicate()
            value = distribute_tensor(seg.stored(plain).contiguous(), mesh, [placement])
            self.register_parameter(f"weight_{seg.name}",
                                    nn.Parameter(value, requires_grad=linear.weight.requires_grad))

    def local_weight(self) -> torch.Tensor:
        """This rank's rows ``[local rows, C]``; the gradients of the shared rows summed over the group."""
        pieces = []
        for seg in self.segments:
            local = getattr(self, f"weight_{seg.name}").to_local()
            if not seg.sharded:  # every rank's heads use these rows: their gradients are summed
                local = gather_rows(local, self.group) if seg.gathered else sum_gradients(local, self.group)
                pieces.append(local if seg.rows is None else local[seg.rows[0]:seg.rows[1]])
            elif seg.head_major:
                pieces.append(local)
            else:
                pieces.append(local.transpose(0, 1).reshape(-1, self.in_features))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(sum_gradients(x, self.group), self.local_weight())

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{s.name}:{'sharded' if s.sharded else 'gathered' if s.gathered else 'shared'}"
                          for s in self.segments)
        return f"in_features={self.in_features}, out_features={self.out_features} ({kinds})"
