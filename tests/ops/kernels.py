"""What the kernel tests of tpa.ops share: where kernels can run, and the fresh-process fallback.

Kernels run compiled on a GPU, or on the CPU under Triton's interpreter when ``TRITON_INTERPRET=1``
was set before triton was first imported (``tests/conftest.py`` does that). When another module
imported triton first, the interpreter is off in this process: the kernel tests skip here and
:func:`rerun_with_interpreter` runs them in a fresh process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def _kernels_runnable() -> bool:
    if not HAVE_TRITON:
        return False
    if DEVICE == "cuda":
        return True
    from tpa.ops.decode import triton_interpreter_active

    return triton_interpreter_active()


KERNELS_RUNNABLE = _kernels_runnable()


def _cpu_kernels_runnable() -> bool:
    if not HAVE_TRITON:
        return False
    from tpa.ops.decode import triton_interpreter_active

    return triton_interpreter_active()


# Kernels on CPU tensors (models built on the CPU with decode_impl="kernel"): only under Triton's
# interpreter, which is off on a machine with CUDA (there the GPU tests run the kernels compiled)
CPU_KERNELS_RUNNABLE = _cpu_kernels_runnable()
needs_cpu_kernels = pytest.mark.skipif(
    not CPU_KERNELS_RUNNABLE,
    reason="runs Triton kernels on CPU tensors: needs Triton's interpreter (TRITON_INTERPRET=1 before triton's "
           "first import; tests/conftest.py sets it where there is no CUDA)",
)


def skip_unless_kernels(fresh_test: str):
    """Skip marker of a kernel test when kernels cannot run in this process; ``fresh_test`` names the
    test of the same file that reruns it through :func:`rerun_with_interpreter`."""
    return pytest.mark.skipif(
        not KERNELS_RUNNABLE,
        reason=f"no triton, or triton imported before TRITON_INTERPRET=1 could be set; {fresh_test} runs these",
    )


def rerun_with_interpreter(test_file: str, select: str) -> None:
    """Run the tests of ``test_file`` matching ``-k select`` in a fresh interpreter process with
    ``TRITON_INTERPRET=1``; skip when the kernel tests already ran in this process."""
    if KERNELS_RUNNABLE or not HAVE_TRITON:
        pytest.skip("kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
