"""Tests of tpa.ops run their Triton kernels on the GPU when there is one, otherwise on the CPU
through Triton's interpreter.

Triton decides at import time whether its own library functions are interpreted, so
``TRITON_INTERPRET=1`` must be set before triton is first imported. tpa never imports triton at
package import, so this conftest is early enough unless a test module collected before this
directory imported triton itself; test_decode.py detects that case and reruns its kernel tests in a
fresh process. On a machine with CUDA the variable is left alone (the kernels run compiled).
"""

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
