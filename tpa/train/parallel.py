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

from tpa.utils.devices import resolve_device


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    tp_size: int = 1  # tensor-parallel ranks per model replica (consecutive ranks form a TP group)
    mesh: object = None  # the (dp, tp) DeviceMesh when tp_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which model replica this rank belongs to: the ranks of one TP group read the same data."""
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", tp: int = 1) -> Dist:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPUs, gloo on CPUs); with
    ``tp > 1``, the ``(dp, tp)`` device mesh of :func:`tpa.parallel.make_mesh`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)  # auto: cuda where available; a missing device is a clear UsageError
    if dev.type == "cuda" and world_size > 1 and device in ("auto", "cuda"):
        dev = torch.device("cuda", local_rank)  # rank r of a node takes its node's GPU LOCAL_RANK
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    mesh = None
    if tp > 1:
        if world_size % tp:
            raise ValueError(f"tp={tp} must divide the number of ranks ({world_size}); launch with torchrun")
        from tpa.parallel import make_mesh

        mesh = make_mesh(tp, dev.type)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, tp_size=tp, mesh=mesh)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_parallel(parallel: str, world: Dist) -> str:
    if world.tp_size > 1:  # data parallel over the TP groups: FSDP2 on the mesh's dp dimension, or none
        if parallel == "ddp":
            raise ValueError("tensor parallelism composes with FSDP2 (parallel='fsdp' or 'auto'), not DDP")
        return "fsdp" if world.dp_size > 1 or parallel == "fsdp" else "none"
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
                activation_checkpointing: bool, tp_shard_shared: bool = False) -> torch.nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to a T6 model already on its device.

    Returns the module to call for training (the DDP wrapper for DDP, the model itself otherwise).
    With ``world.tp_size > 1`` tensor parallelism comes first (:func:`tpa.parallel.apply_tensor_parallel`
    over the mesh's ``tp`` dimension) and FSDP2 shards over its ``dp`` dimension, as torchtitan composes them.
    """
    dp_mesh = None
    if world.tp_size > 1:
        from tpa.parallel import apply_tensor_parallel

        apply_tensor_parallel(model, world.mesh["tp"], shard_shared=tp_shard_shared)
        dp_mesh = world.mesh["dp"]
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
            fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the model's only buffers are the RoPE tables, computed alike on every rank: no broadcast per step
        return DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                   broadcast_buffers=False)
    return model
