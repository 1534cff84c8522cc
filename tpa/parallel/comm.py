"""Megatron's f/g operators for tensor parallelism, as autograd functions over a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_heads", "gather_rows", "sum_gradients"]


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        # a view of the input in eager mode (no copy); a copy when compiled, where a view returned by a custom
        # Function trips autograd's view+inplace check on DTensor.to_local's output (tpa train --tp --compile)
        return x.clone() if torch.compiler.is_compiling() else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_gradients(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` unchanged; its gradient summed over ``group`` (where every rank's part of it is partial)."""
    if not x.requires_grad:
        return x
    return _SumGradients.apply(x, group)


class _GatherHeads(torch.autograd.Function):
    """Forward: the ranks' tensors concatenated on ``dim`` in rank order; backward: this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.rank, ctx.local = dim, dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the gathered tensor feeds the same computation on every rank: its gradient is the same there
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local), None, None


def gather_heads(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """``[.., H/N, ..]`` of each rank of ``group`` -> ``[.., H, ..]`` (rank ``r``'s heads at ``[r H/N, (r+1) H/N)``)."""
    return _GatherHeads.apply(x, dim, group)


class _GatherRows(torch.autograd.Function):
    """Forward: the ranks' row blocks concatenated (all-gather on dim 0); backward: the gradient summed
    over the group and this rank's block of it (reduce-scatter), as FSDP does for a sharded weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Rows ``[S/N, ...]`` of each rank of ``group`` -> ``[S, ...]``; the gradient of the result, partial
    on each rank, is summed and scattered back."""
    return _GatherRows.apply(x, group)
