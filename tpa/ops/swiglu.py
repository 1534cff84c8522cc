"""SwiGLU's activation in one launch: ``silu(gate) * up`` of a fused ``[..., 2 * I]`` projection.

Done with torch ops this is two kernels per block (the SiLU and the product), and at a batch of more
than one row both read strided views of the fused projection (the gate and up halves of each row), so
they run torch's non-vectorised elementwise path: about 2.5 microseconds each per one-token step of
the ``small`` preset at batch 8 on an H200. :func:`silu_mul` reads each row's halves in one Triton
launch (:mod:`tpa.ops.kernels.swiglu`); :func:`silu_mul_reference` is its twin, exactly
:class:`tpa.modules.SwiGLU`'s ops.

As :mod:`tpa.ops.add_norm`, the kernel's host side is a plain ``triton.jit`` launch, so the model uses
it in the static one-token step that a CUDA graph replays. ``backend`` as there.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from tpa.ops.triton_support import HAVE_TRITON, next_pow2, require_runnable, triton_interpreter_active

__all__ = ["silu_mul", "silu_mul_reference"]

_BLOCK = 1024


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul` in torch ops (same argument and result)."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def _use_triton(backend: str, gate_up: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"silu_mul: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference" or torch.compiler.is_compiling() or type(gate_up) is not torch.Tensor:
        return False  # traced, or a tensor subclass (a DTensor): the torch ops
    if torch.is_grad_enabled() and gate_up.requires_grad:  # the kernel has no backward
        return False
    if backend == "triton":
        require_runnable("silu_mul", gate_up.device.type)
        if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"silu_mul: the kernel takes float32, bfloat16 or float16, got {gate_up.dtype}")
        return True
    return HAVE_TRITON and gate_up.is_cuda and gate_up.dtype != torch.float64


def _launch(gate_up: torch.Tensor) -> torch.Tensor:
    import triton

    from tpa.ops.kernels.swiglu import silu_mul_kernel

    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    block = min(_BLOCK, next_pow2(width))
    fix = triton_interpreter_active() and gate_up.dtype == torch.bfloat16
    if rows.shape[0] and width:
        with torch.cuda.device(gate_up.device) if gate_up.is_cuda else nullcontext():
            silu_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
                rows, out, rows.stride(0), width, width, BLOCK=block, FIX_BF16=fix)
    return out


def silu_mul(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = gate_up.split(I, dim=-1)``.

    Args:
        gate_up: ``[..., 2 * I]``, the gate projection's outputs then the up projection's.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (module docstring).

    Returns:
        ``[..., I]`` in ``gate_up``'s dtype.

    Raises:
        ValueError: an odd last dimension.
    """
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: gate_up must be [..., 2 * I], got {tuple(gate_up.shape)}")
    if not _use_triton(backend, gate_up):
        return silu_mul_reference(gate_up)
    return _launch(gate_up)
