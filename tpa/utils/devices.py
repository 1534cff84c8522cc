"""Choosing a device and a dtype from a command-line name (``auto``, ``cuda:1``, ``bf16``, ...)."""

from __future__ import annotations

import os

from tpa.utils.args import UsageError


def resolve_device(name: str):
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is not there is an error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device):
    """``auto`` -> bfloat16 on GPUs that have it, else float32."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise UsageError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
