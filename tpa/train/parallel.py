"""Process setup and the one place where parallelism is applied to a single-device model.

:func:`parallelize` follows torchtitan's order: activation checkpointing, then ``torch.compile``,
then data parallelism (DDP, or FSDP2 ``fully_shard`` on every transformer block and then the root,
with a bf16 mixed-precision policy). Module names and state-dict keys stay those of the plain
model, so checkpoints and exports do not depend on the options.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available (this torch build or "
                         "machine has no CUDA GPU); use --device cpu or auto")
    if device == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_parallel(parallel: str, world: Dist) -> str:
    if parallel == "auto":
        return "ddp" if world.enabled else "none"
    if parallel in ("ddp", "fsdp") and not world.enabled:
        return "none" if parallel == "ddp" else "fsdp"
    if parallel == "none" and world.enabled:
        raise ValueError("parallel='none' under torchrun with several ranks: choose ddp or fsdp")
    return parallel


def _checkpointed_forward(module: torch.nn.Module):
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    return forward


def parallelize(model: torch.nn.Module, *, parallel: str, world: Dist, bf16: bool, compile: bool,
                activation_checkpointing: bool) -> torch.nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to a T6 model already on its device.

    Returns the module to call for training (the DDP wrapper for DDP, the model itself otherwise).
    """
    layers = list(model.model.layers)
    if activation_checkpointing:
        for layer in layers:
            layer.forward = _checkpointed_forward(layer)
    if compile:
        for layer in layers:
            layer.compile()
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for i, layer in enumerate(layers):
            # the last block's parameters are needed at once by the backward: no reshard after forward
            fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
        fully_shard(model, mp_policy=mp)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the model's only buffers are the RoPE tables, computed alike on every rank: no broadcast per step
        return DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                   broadcast_buffers=False)
    return model
