"""What the Triton ops share on the host side, without importing Triton.

- ``HAVE_TRITON``: whether Triton is installed (the kernels in :mod:`tpa.ops.kernels` are imported
  only then, on the first call of a Triton path).
- :func:`next_pow2`: block sizes.
- :func:`triton_interpreter_active`, :func:`require_runnable`: whether kernels on CPU tensors can run
  (Triton's interpreter, chosen by ``TRITON_INTERPRET=1`` before Triton's first import).
- :func:`launch_hooks_active`: whether Triton's launch hooks (profilers) are set, which a cached
  kernel handle must honour.
"""

from __future__ import annotations

import importlib.util

__all__ = ["HAVE_TRITON", "launch_hooks_active", "next_pow2", "require_runnable", "triton_interpreter_active"]

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def least_padding_block(heads: int, lo: int, hi: int) -> int:
    """The largest power of two in ``[lo, hi]`` whose multiple covering ``heads`` is smallest."""
    best, best_pad = lo, None
    bh = lo
    while bh <= hi:
        pad = -(-heads // bh) * bh
        if best_pad is None or pad <= best_pad:
            best, best_pad = bh, pad
        bh *= 2
    return best


def triton_interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    if not HAVE_TRITON:
        return False
    import triton.language as language

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(language.zeros, InterpretedFunction)


def require_runnable(op: str, device_type: str) -> None:
    """Raise unless the Triton kernels of ``op`` can run on tensors of ``device_type``."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"{op}: backend='triton' runs on CUDA (or CPU via the interpreter), not {device_type}")
    if device_type == "cpu" and not triton_interpreter_active():
        raise RuntimeError(
            f"{op}: the Triton kernel on CPU tensors needs Triton's interpreter; set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )


_HOOK_HOLDER = None  # where Triton keeps its launch hooks, found on the first check


def _hook_holder():
    global _HOOK_HOLDER
    try:
        from triton import knobs

        _HOOK_HOLDER = knobs.runtime
        _HOOK_HOLDER.launch_enter_hook, _HOOK_HOLDER.launch_exit_hook  # noqa: B018  # both, or the fallback
    except (ImportError, AttributeError):  # triton < 3.3 keeps them on CompiledKernel
        from triton.compiler import CompiledKernel

        _HOOK_HOLDER = CompiledKernel
    return _HOOK_HOLDER


def launch_hooks_active() -> bool:
    """Whether a Triton launch hook is set (profilers such as proton): a cached kernel handle then
    launches through ``triton.jit``, which calls them. Read at every launch, as Triton does; a hook
    is a function, or from Triton 3.5 a HookChain whose ``calls`` are empty unless a profiler added to it."""
    holder = _HOOK_HOLDER or _hook_holder()
    enter, leave = holder.launch_enter_hook, holder.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))
