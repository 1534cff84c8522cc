"""Tests of tpa.ops run their Triton kernels on the GPU when there is one, otherwise on the CPU
through Triton's interpreter.

Triton decides at import time whether its own library functions are interpreted, so
``TRITON_INTERPRET=1`` must be set before triton is first imported (``import tpa`` may import it,
through torch._dynamo). The root ``tests/conftest.py`` sets it before anything imports tpa; this
conftest covers running this directory alone. When triton was imported earlier all the same, the
kernel test modules detect it and rerun their kernel tests in a fresh process
(``tests/ops/kernels.py``). On a machine with CUDA the variable is left alone (the kernels run compiled).
"""

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fresh_decode_plans():
    """An empty table of decode launch plans before and after the test (tests that count plans)."""
    from tpa.ops import decode_launch

    decode_launch.clear_plans()
    yield
    decode_launch.clear_plans()
