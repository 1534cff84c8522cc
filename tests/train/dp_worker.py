"""Code the data-parallel tests run in each spawned gloo rank: a real :class:`~tpa.train.trainer.Trainer`
(importable by spawned processes; the test passes the prepared data directory and a run directory)."""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.distributed as dist

from tpa.train.parallel import setup_distributed, teardown_distributed
from tpa.train.trainer import Trainer, _StopFlag
from train.conftest import tiny_config

STEPS = 4


def _trainer(rank: int, world_size: int, port: int, data_dir: str, run_dir: str, **overrides) -> Trainer:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    cfg = tiny_config(data_dir, run_dir, device="cpu", max_steps=STEPS, **overrides)
    return Trainer(cfg, setup_distributed("cpu"))


def _bucket_passes(trainer: Trainer) -> list[Counter]:
    """Train STEPS optimizer steps, counting each bucket's all-reduces per step through a comm hook."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buckets: list[int] = []

    def counting_hook(state, bucket):
        buckets.append(bucket.index())
        return allreduce_hook(None, bucket)

    trainer.train_model.register_comm_hook(None, counting_hook)
    trainer.train_model.train()
    per_step = []
    for _ in range(STEPS):
        buckets.clear()
        trainer.train_step(_StopFlag())
        per_step.append(Counter(buckets))
    return per_step


def ddp_allreduces(rank: int, world_size: int, port: int, data_dir: str, run_dir: str) -> None:
    """DDP with buckets of 16 KiB, with 4 accumulation steps and without: the options reach the wrapper
    (static graph only without accumulation), and each optimizer step all-reduces every bucket exactly
    once (none in the ``no_sync`` micro-steps)."""
    for accum, static in ((4, False), (1, True)):
        trainer = _trainer(rank, world_size, port, data_dir, f"{run_dir}-{accum}", parallel="ddp",
                           global_batch_size=2 * accum, micro_batch_size=1, ddp_bucket_mb=1 / 64)
        ddp = trainer.train_model
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and trainer.accum == accum
        assert ddp.gradient_as_bucket_view and ddp.static_graph == static and ddp.bucket_bytes_cap == 16 * 1024
        logged = ddp._get_ddp_logging_data()
        assert (logged["gradient_as_bucket_view"], logged.get("static_graph", 0), logged["bucket_cap_bytes"]) == \
            (1, int(static), 16 * 1024), logged
        per_step = _bucket_passes(trainer)
        # one pass over the buckets per optimizer step: each bucket once (the first steps have one bucket of
        # all the gradients, until DDP builds its buckets from the order the gradients became ready)
        assert all(set(counts.values()) == {1} for counts in per_step), (accum, per_step)
        assert len(per_step[0]) == 1 and len(per_step[-1]) > 1 and per_step[-2] == per_step[-1], (accum, per_step)


def _reductions_per_step(trainer: Trainer) -> list[int]:
    """Train STEPS optimizer steps, counting FSDP2's gradient reductions (reduce-scatters, one call per
    FSDP unit) in each (through FSDP2's internal ``foreach_reduce``)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    calls = []
    inner = _fsdp_param_group.foreach_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = counting
    try:
        per_step = []
        for _ in range(STEPS):
            calls.clear()
            trainer.train_step(_StopFlag())
            per_step.append(len(calls))
    finally:
        _fsdp_param_group.foreach_reduce = inner
    return per_step


def fsdp_settings(rank: int, world_size: int, port: int, data_dir: str, run_dir: str) -> None:
    """FSDP2 with 4 accumulation steps: one gradient reduction per FSDP unit per optimizer step (none in
    the micro-steps without gradient sync); every block resharded after the forward but the last, explicit prefetch of the next block
    (forward) and the previous one (backward), float32 reduction; bf16 all-gathers under bf16."""
    from torch.distributed.fsdp import FSDPModule

    from tpa.train.parallel import DataParallelOptions, apply_fsdp

    trainer = _trainer(rank, world_size, port, data_dir, run_dir, parallel="fsdp", micro_batch_size=1,
                       model_overrides={"num_hidden_layers": 3})
    assert trainer.accum == 4
    assert _reductions_per_step(trainer) == [4] * STEPS  # 3 blocks and the root, in the last micro-batch
    layers = list(trainer.model.model.layers)
    states = [layer._get_fsdp_state() for layer in layers]
    assert all(isinstance(layer, FSDPModule) for layer in layers) and isinstance(trainer.model, FSDPModule)
    assert [s._fsdp_param_group.post_forward_mesh_info is not None for s in states] == [True, True, False]
    if hasattr(FSDPModule, "set_modules_to_forward_prefetch"):
        assert [s._states_to_forward_prefetch for s in states] == [[states[1]], [states[2]], []]
        assert [s._states_to_backward_prefetch for s in states] == [[], [states[0]], [states[1]]]
    for state in states:
        assert state._mp_policy.param_dtype is None and state._mp_policy.reduce_dtype == torch.float32
    # the same wrapping of a fresh model with bf16 and two blocks of prefetch
    model = type(trainer.model)(trainer.mconfig)
    apply_fsdp(model, list(model.model.layers), None, True, DataParallelOptions(fsdp_prefetch=2))
    first = model.model.layers[0]._get_fsdp_state()
    assert first._mp_policy.param_dtype == torch.bfloat16 and first._mp_policy.reduce_dtype == torch.float32
    if hasattr(FSDPModule, "set_modules_to_forward_prefetch"):
        assert first._states_to_forward_prefetch == [layer._get_fsdp_state() for layer in model.model.layers[1:3]]
    dist.barrier()


def wrapper_settings(rank: int, world_size: int, port: int, data_dir: str, run_dir: str) -> None:
    """:func:`ddp_allreduces` then :func:`fsdp_settings`, in one process group (one spawn of the ranks)."""
    try:
        ddp_allreduces(rank, world_size, port, data_dir, f"{run_dir}-ddp")
        fsdp_settings(rank, world_size, port, data_dir, f"{run_dir}-fsdp")
    finally:
        teardown_distributed()
