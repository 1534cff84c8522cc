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
    """``@pytest.mark.gpu`` tests skip cleanly on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with `python -m pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
