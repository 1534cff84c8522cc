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


# What ``parallel='auto'`` picks under torchrun (without tensor parallelism), by model size: the
# last row whose parameter count the model reaches wins. It rests on one measurement (BENCHMARKS.md,
# 2026-11-23, `small` TPA, 124M parameters, two H200s, global batch 32): DDP 1.69x one GPU, FSDP2
# 1.13x, both with the settings before DDP's static graph / bucket views and FSDP2's explicit prefetch.
# Nothing above `small` or beyond two GPUs is measured, so DDP is the pick for every size until a
# measurement says from which size FSDP2 is faster (add a row such as ``(1_000_000_000, "fsdp")``).
AUTO_PARALLEL: tuple[tuple[int, str], ...] = ((0, "ddp"),)


def auto_parallel(num_parameters: int) -> str:
    """The data-parallel mode of :data:`AUTO_PARALLEL` for a model of ``num_parameters``."""
    mode = AUTO_PARALLEL[0][1]
    for threshold, choice in AUTO_PARALLEL:
        if num_parameters >= threshold:
            mode = choice
    return mode


def resolve_parallel(parallel: str, world: Dist, num_parameters: int = 0) -> str:
    """The data-parallel mode to apply: ``parallel`` made concrete for this world (``auto`` by
    :func:`auto_parallel`; ``ddp`` on one rank is no wrapper; FSDP2 over the TP groups with ``tp > 1``)."""
    if world.tp_size > 1:  # data parallel over the TP groups: FSDP2 on the mesh's dp dimension, or none
        if parallel == "ddp":
            raise ValueError("tensor parallelism composes with FSDP2 (parallel='fsdp' or 'auto'), not DDP")
        return "fsdp" if world.dp_size > 1 or parallel == "fsdp" else "none"
    if parallel == "auto":
        return auto_parallel(num_parameters) if world.enabled else "none"
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


@dataclass
class DataParallelOptions:
    """How DDP and FSDP2 are set up (``tpa train --ddp-bucket-mb``, ``--ddp-static-graph``, ``--fsdp-prefetch``).

    ddp_bucket_mb: DDP's gradient bucket size in MiB (``bucket_cap_mb``; torch's default 25).
    ddp_static_graph: DDP's ``static_graph``: the set of parameters that get gradients and the order of
        their hooks are the same every step (true of every T6 model: a test checks that every attention
        type uses every parameter), so DDP builds its buckets once from the first step's order. Applied
        only without gradient accumulation: torch's DDP fails with ``static_graph`` and ``no_sync()``
        (an internal assert on the first backward, pytorch/pytorch#143580; the open fix, #187732, says
        gradients also stop being all-reduced once the assert is passed).
    fsdp_prefetch: how many blocks ahead FSDP2 all-gathers explicitly, in the forward (the next blocks)
        and the backward (the previous ones); 0 leaves FSDP2's implicit prefetching of one block.
    gradient_accumulation: micro-batches per optimizer step on each rank.
    """

    ddp_bucket_mb: float = 25.0
    ddp_static_graph: bool = True
    fsdp_prefetch: int = 1
    gradient_accumulation: int = 1

    @property
    def static_graph(self) -> bool:
        """Whether DDP gets ``static_graph=True``: asked for, and no ``no_sync()`` micro-steps."""
        return self.ddp_static_graph and self.gradient_accumulation == 1


def apply_ddp(model: torch.nn.Module, world: Dist, options: DataParallelOptions, compiled: bool):
    """Wrap ``model`` in DDP, with the gradient all-reduce overlapped with the backward.

    Gradients are views into the all-reduce buckets (``gradient_as_bucket_view``: no copy into the
    buckets and back, and no second copy of the gradients in memory); each bucket's all-reduce starts
    as soon as its gradients are ready. With compiled blocks, dynamo's DDP optimizer
    (``optimize_ddp='ddp_optimizer'``, as torchtitan sets without compiled autograd) splits each block's
    graph at the bucket boundaries, so a bucket's all-reduce does not wait for the block's whole backward.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if compiled:
        first_mb = dist._DEFAULT_FIRST_BUCKET_BYTES / 2**20
        if options.ddp_bucket_mb < first_mb:  # else dynamo's DDP optimizer fails at the first forward
            raise ValueError(f"ddp_bucket_mb={options.ddp_bucket_mb} with compile: dynamo's DDP optimizer needs "
                             f"buckets of at least DDP's first bucket ({first_mb:g} MiB)")
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    # the model's only buffers are the RoPE tables, computed alike on every rank: no broadcast per step
    return DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
               broadcast_buffers=False, bucket_cap_mb=options.ddp_bucket_mb, gradient_as_bucket_view=True,
               static_graph=options.static_graph)


def apply_fsdp(model: torch.nn.Module, layers: list, mesh, bf16: bool, options: DataParallelOptions) -> None:
    """FSDP2 ``fully_shard`` on every block, then the root, as torchtitan shards a LLaMA.

    Blocks reshard (free their gathered parameters) after the forward but for the last, whose
    parameters the backward needs at once; with ``bf16`` the parameters are all-gathered in bf16 and
    the gradients reduced in float32. Blocks prefetch the all-gathers of the next ``fsdp_prefetch``
    blocks in the forward and of the previous ones in the backward (where the torch version has it).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for i, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    depth = options.fsdp_prefetch
    if depth < 1 or not hasattr(model, "set_modules_to_forward_prefetch"):
        return
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch(layers[i + 1:i + 1 + depth])
        if i > 0:
            layer.set_modules_to_backward_prefetch(layers[max(0, i - depth):i][::-1])


def parallelize(model: torch.nn.Module, *, parallel: str, world: Dist, bf16: bool, compile: bool,
                activation_checkpointing: bool, tp_shard_shared: bool = False,
                options: DataParallelOptions | None = None) -> torch.nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to a T6 model already on its device.

    Returns the module to call for training (the DDP wrapper for DDP, the model itself otherwise).
    With ``world.tp_size > 1`` tensor parallelism comes first (:func:`tpa.parallel.apply_tensor_parallel`
    over the mesh's ``tp`` dimension) and FSDP2 shards over its ``dp`` dimension, as torchtitan composes them.
    """
    options = options or DataParallelOptions()
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
        apply_fsdp(model, layers, dp_mesh, bf16, options)
        return model
    if parallel == "ddp":
        return apply_ddp(model, world, options, compiled=compile)
    return model
