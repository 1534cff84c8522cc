"""A residual add and the RMSNorm after it, in one launch: ``s = x + delta``, ``y = rms_norm(s) * weight``.

A pre-norm block adds each sublayer's output to the residual stream and normalises the sum for the
next sublayer: two kernels per sublayer, 24 adds and 25 norms per one-token step of a 12-layer model,
each a couple of microseconds of GPU time for a few kilobytes. :func:`add_rms_norm` does both in one
Triton launch (:mod:`tpa.ops.kernels.add_norm`); :func:`add_rms_norm_reference` is its twin in torch
ops, exactly :class:`tpa.modules.RMSNorm` of ``x + delta``.

The kernel's host side is a plain ``triton.jit`` launch (tens of microseconds of host time), so the
model uses it where host time does not count: the static one-token step, which is replayed from a
CUDA graph (:mod:`tpa.models.t6.decode_graph`). While ``torch.compile`` traces, the twin runs.
``backend="auto"`` runs the kernel on CUDA tensors (not float64) and the twin elsewhere;
``backend="triton"`` forces the kernel (on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from tpa.ops.triton_support import HAVE_TRITON, next_pow2, require_runnable, triton_interpreter_active

__all__ = ["add_rms_norm", "add_rms_norm_reference", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension, in float32 (float64 for float64 input), cast
    back to ``x``'s dtype (the arithmetic of :class:`tpa.modules.RMSNorm`)."""
    if x.is_cuda and x.dtype == weight.dtype:  # the fused CUDA kernel accumulates in float32
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    work = torch.promote_types(x.dtype, torch.float32)
    return F.rms_norm(x.to(work), (x.shape[-1],), weight.to(work), eps).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` in torch ops (same arguments and result)."""
    total = x if delta is None else x + delta
    return total, rms_norm(total, weight, eps)


def _check(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"add_rms_norm: x must be [..., C] and weight [C], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device):
        raise ValueError(f"add_rms_norm: delta must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                         f"{tuple(delta.shape)} {delta.dtype} on {delta.device}")


def _use_triton(backend: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"add_rms_norm: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference" or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return False  # traced (Inductor fuses the twin's ops), or a tensor subclass (a DTensor)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # the kernel has no backward
        return False
    if backend == "triton":
        require_runnable("add_rms_norm", x.device.type)
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"add_rms_norm: the kernel takes float32, bfloat16 or float16, got {x.dtype}")
        return True
    return HAVE_TRITON and x.is_cuda and x.dtype != torch.float64 and weight.dtype == x.dtype


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, C]`` with unit feature stride (a view where the layout allows)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x, delta, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    from tpa.ops.kernels.add_norm import add_rms_norm_kernel

    channels = x.shape[-1]
    x_rows = _rows(x)
    d_rows = _rows(delta) if delta is not None else x_rows
    total = torch.empty_like(x, memory_format=torch.contiguous_format) if delta is not None else x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s_rows = _rows(total) if delta is not None else x_rows
    o_rows = out.view(-1, channels)
    fix = triton_interpreter_active() and x.dtype == torch.bfloat16
    if x_rows.shape[0]:
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            add_rms_norm_kernel[(x_rows.shape[0],)](
                x_rows, d_rows, weight.contiguous(), s_rows, o_rows, x_rows.stride(0), d_rows.stride(0),
                s_rows.stride(0), o_rows.stride(0), channels, float(eps),
                HAS_DELTA=delta is not None, BLOCK_C=next_pow2(channels), FIX_BF16=fix,
            )
    return total, out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum and its RMSNorm.

    Args:
        x: ``[..., C]`` the residual stream.
        delta: ``[..., C]`` a sublayer's output to add (same shape, dtype and device as ``x``), or None
            (normalise ``x`` alone).
        weight: ``[C]`` the norm's gain.
        eps: added to the mean square before the square root.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (module docstring). The kernel needs no
            gradient (``backend="triton"`` with a tensor that needs one takes the twin).

    Returns:
        ``(x + delta, rms_norm(x + delta) * weight)``, both ``[..., C]`` in ``x``'s dtype (``x`` itself
        as the first when ``delta`` is None).

    Raises:
        ValueError: mis-shaped or mismatched inputs.
    """
    _check(x, delta, weight)
    if not _use_triton(backend, x, weight):
        return add_rms_norm_reference(x, delta, weight, eps)
    return _launch(x, delta, weight, eps)
