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

import functools
import importlib.util

__all__ = ["HAVE_TRITON", "launch_hooks_active", "next_pow2", "require_runnable", "triton_interpreter_active"]

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << max(0, (int(x) - 1).bit_length())


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


@functools.lru_cache(maxsize=1)
def _hook_holder():
    try:
        from triton import knobs

        return knobs.runtime
    except (ImportError, AttributeError):  # triton < 3.3 keeps them on CompiledKernel
        from triton.compiler import CompiledKernel

        return CompiledKernel


def _active(hook) -> bool:
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)  # triton >= 3.5: a HookChain, empty unless a profiler added to it
    return bool(calls) if calls is not None else True


def launch_hooks_active() -> bool:
    """Whether a Triton launch hook is set (profilers such as proton): a cached kernel handle then
    launches through ``triton.jit``, which calls them. Read at every launch, as Triton does."""
    holder = _hook_holder()
    return _active(getattr(holder, "launch_enter_hook", None)) or _active(getattr(holder, "launch_exit_hook", None))
