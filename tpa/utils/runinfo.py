"""What to store next to results so that they can be traced: date, command line, git revision,
package versions, device."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Sequence

from tpa.utils.devices import device_name


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_info(device, world_size: int, argv: list[str]) -> dict:
    """Start time, command line, git revision, package versions and the device of a run."""
    import torch

    packages = {}
    for name in ("tensor-product-attention", "torch", "transformers", "tokenizers", "numpy", "triton", "datasets",
                 "tensorboard", "wandb"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": argv,
        "git_revision": _git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "device": str(device),
        "world_size": world_size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


def run_metadata(device, argv: Sequence[str] | None = None) -> dict:
    """Date, command line, git revision, package versions and device, to store next to results."""
    info = run_info(device, 1, list(sys.argv if argv is None else argv))
    info["device_name"] = device_name(device)
    info["date"] = time.strftime("%Y-%m-%d")
    return info
