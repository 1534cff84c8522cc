"""RoPE and the cache write of a one-token static decode step, in one launch.

A cached decode step of TPA (or MHA/GQA/MQA) starts the same way in every layer: split the one
projection output row of each sequence into its parts, rotate the query part and the key part by
RoPE, and write the key/value parts into the cache at the sequence's slot. Done with torch ops that
is about twenty small kernels per layer (casts, four products, a sum, a difference, a concatenation
per rotated part, one scatter per cached part), each a few microseconds of GPU time and far more
than the bytes they move. :func:`step_write` does it in one Triton launch (:mod:`tpa.ops.kernels.step_write`);
:func:`step_write_reference` is its twin in torch ops, the same arithmetic as the layers' own path
(:func:`tpa.modules.rotary.apply_partial_rotary` in float32, then the static step's scatter).

The projection row holds the parts as contiguous segments ``[offset, offset + rows * width)``,
row-major (the layers' ``split`` of their fused projection). :class:`Segment` names one.

While ``torch.compile`` traces, the twin runs whatever the backend (Inductor fuses its ops itself).
Otherwise ``backend="auto"`` runs the kernel on CUDA tensors (not float64) and the twin elsewhere;
``backend="triton"`` forces the kernel (on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tpa.modules.rotary import apply_partial_rotary
from tpa.ops.triton_support import HAVE_TRITON, next_pow2, require_runnable, triton_interpreter_active

__all__ = ["MAX_WRITES", "Segment", "step_write", "step_write_reference"]

MAX_WRITES = 4


@dataclass(frozen=True)
class Segment:
    """Part ``[offset, offset + rows * width)`` of a projection row, read as ``[rows, width]``;
    ``rotate``: RoPE turns the leading ``2 * cos.shape[-1]`` features of each row."""

    offset: int
    rows: int
    width: int
    rotate: bool

    @property
    def size(self) -> int:
        return self.rows * self.width


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, rows, width]`` rotated as the layers rotate ``[B, 1, rows, width]`` (``cos``/``sin [B, half]``)."""
    return apply_partial_rotary(x[:, None], cos[:, None], sin[:, None])[:, 0]


def _part(projected: torch.Tensor, seg: Segment) -> torch.Tensor:
    return projected[:, seg.offset: seg.offset + seg.size].unflatten(-1, (seg.rows, seg.width))


def step_write_reference(projected, cos, sin, slots, query: Segment, writes) -> torch.Tensor:
    """:func:`step_write` in torch ops (same arguments and result)."""
    q = _part(projected, query)
    q = _rotated(q, cos, sin) if query.rotate else q.clone()
    for seg, cache in writes:
        value = _part(projected, seg)
        value = _rotated(value, cos, sin) if seg.rotate else value
        index = slots.reshape(-1, 1, 1, 1).expand(-1, 1, seg.rows, seg.width)
        cache.scatter_(1, index, value[:, None])
    return q


def _check(projected, cos, sin, slots, query: Segment, writes) -> None:
    if projected.dim() != 2 or projected.stride(-1) != 1:
        raise ValueError(f"step_write: projected must be [B, P] with unit stride, got shape {tuple(projected.shape)} "
                         f"strides {projected.stride()}")
    bsz, width = projected.shape
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != bsz or cos.dtype != torch.float32:
        raise ValueError(f"step_write: cos and sin must be float32 [B={bsz}, half], got {tuple(cos.shape)} "
                         f"{cos.dtype} and {tuple(sin.shape)} {sin.dtype}")
    if tuple(slots.shape) != (bsz,) or slots.dtype != torch.long:
        raise ValueError(f"step_write: slots must be int64 [B={bsz}], got {tuple(slots.shape)} {slots.dtype}")
    if not 1 <= len(writes) <= MAX_WRITES:
        raise ValueError(f"step_write takes 1 to {MAX_WRITES} cache writes, got {len(writes)}")
    for seg in (query, *(seg for seg, _ in writes)):
        if seg.offset < 0 or seg.offset + seg.size > width:
            raise ValueError(f"step_write: segment {seg} lies outside the projection row of {width} values")
        if seg.rotate and 2 * cos.shape[-1] > seg.width:
            raise ValueError(f"step_write: RoPE turns {2 * cos.shape[-1]} features, segment {seg} has {seg.width}")
    for seg, cache in writes:
        if cache.dim() != 4 or cache.shape[0] != bsz or tuple(cache.shape[2:]) != (seg.rows, seg.width):
            raise ValueError(f"step_write: the cache of segment {seg} must be [B={bsz}, capacity, {seg.rows}, "
                             f"{seg.width}], got {tuple(cache.shape)}")
        if cache.dtype != projected.dtype or cache.device != projected.device or cache.stride(-1) != 1:
            raise ValueError(f"step_write: a cache must be {projected.dtype} on {projected.device} with unit feature "
                             f"stride, got {cache.dtype} on {cache.device}, strides {cache.stride()}")


def _use_triton(backend: str, projected: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"step_write: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference" or torch.compiler.is_compiling():  # traced: Inductor fuses the twin's ops
        return False
    if backend == "triton":
        require_runnable("step_write", projected.device.type)
        return True
    return HAVE_TRITON and projected.is_cuda and projected.dtype != torch.float64


def _launch(projected, cos, sin, slots, query: Segment, writes) -> torch.Tensor:
    from tpa.ops.kernels.step_write import step_write_kernel

    bsz = projected.shape[0]
    half = cos.shape[-1]
    out = projected.new_empty(bsz, query.rows, query.width)
    caches, shapes = [], []
    for seg, cache in writes:
        caches += [cache, cache.stride(0), cache.stride(1), cache.stride(2)]
        shapes += [seg.offset, seg.rows, seg.width, half if seg.rotate else 0, next_pow2(seg.rows), next_pow2(seg.width)]
    for _ in range(MAX_WRITES - len(writes)):  # unused slots of the signature
        caches += caches[:4]
        shapes += [0, 1, 1, 0, 1, 1]
    fix = triton_interpreter_active() and projected.dtype == torch.bfloat16
    with torch.cuda.device(projected.device) if projected.is_cuda else nullcontext():
        step_write_kernel[(bsz, 1 + len(writes))](
            projected, projected.stride(0), cos, sin, cos.stride(0), slots, out, *caches,
            query.offset, query.rows, query.width, next_pow2(query.rows), next_pow2(query.width), *shapes,
            half if query.rotate else 0, len(writes), fix,
        )
    return out


def step_write(projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
               query: Segment, writes, *, backend: str = "auto") -> torch.Tensor:
    """Rotate the query part of each projection row and write the cache parts at each row's slot.

    Args:
        projected: ``[B, P]`` one projection output row per sequence (unit last stride).
        cos, sin: ``[B, half]`` float32 RoPE tables of each sequence's position (rows ``2 * half``
            features wide are turned; the rest of a rotated row is copied).
        slots: ``[B]`` int64, the cache slot each sequence's token goes to (``< capacity``, not checked).
        query: the query part, returned as ``[B, rows, width]`` (rotated when ``query.rotate``).
        writes: 1 to 4 pairs ``(segment, cache)``, ``cache [B, capacity, rows, width]`` with unit
            feature stride (the other strides free: a padded head-factor buffer's view), written in
            place at ``[b, slots[b]]`` with the segment (rotated when ``segment.rotate``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (module docstring).

    Returns:
        The query part ``[B, query.rows, query.width]``, a new tensor in ``projected``'s dtype.

    Raises:
        ValueError: mis-shaped or mismatched inputs (every message says what was expected).
    """
    writes = list(writes)
    _check(projected, cos, sin, slots, query, writes)
    if not _use_triton(backend, projected):
        return step_write_reference(projected, cos, sin, slots, query, writes)
    return _launch(projected, cos.contiguous(), sin.contiguous(), slots.contiguous(), query, writes)
