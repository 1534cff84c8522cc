"""Tensor parallelism on CPUs (gloo, 2 spawned ranks): forward, every gradient, cached decoding and greedy
generation equal one process for every attention type (float32, relative error <= 1e-5); the per-rank
cache holds R(H/N + D) numbers per token for TPA; bad head counts give clear errors."""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from parallel import tp_worker


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, nprocs: int = 2) -> None:
    mp.start_processes(fn, args=(nprocs, _port(), *args), nprocs=nprocs, start_method="spawn", join=True)


@pytest.mark.parametrize("group", [["tpa", "tpa-gate-factors", "tpa-share-kv-b", "tpa-order3", "tpa_kvonly"],
                                   ["mha", "gqa", "mqa", "mla", "mla-no-q-lora"]], ids=["tpa", "baselines"])
def test_tp2_equals_one_process(group):
    _spawn(tp_worker.run_cases, group)


def test_tp_refuses_what_it_cannot_shard():
    _spawn(tp_worker.run_errors)
