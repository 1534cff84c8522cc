import os
import sys

# Triton kernels run on the CPU through Triton's interpreter, which must be chosen before triton is
# first imported: set it here, before any test module is collected.
if "triton" not in sys.modules:
    try:
        import torch as _torch

        _cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _cuda = False
    if not _cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests skip cleanly on a machine without CUDA; ``@pytest.mark.slow`` tests
    (longer loops of the same checks) run only when asked for: ``python -m pytest -m slow``."""
    run_slow = "slow" in (config.getoption("markexpr", "") or "")
    skip_slow = pytest.mark.skip(reason="a longer variant: run it with `python -m pytest -m slow`")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with `python -m pytest -m gpu` on a GPU machine)")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
