"""Tensor parallelism on CPUs (gloo, 2 spawned ranks): forward, every gradient, cached decoding and greedy
generation equal one process for every attention type (float32, relative error <= 1e-5); the per-rank
cache holds R(H/N + D) numbers per token for TPA; DCP checkpoints move between TP and one process;
bad head counts give clear errors."""

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


@pytest.mark.parametrize("group", [["tpa", "tpa-factors-share-kv-b", "tpa-order3", "tpa_kvonly"],
                                   ["mla", "mha", "gqa", "mqa", "mla-no-q-lora"]], ids=["tpa", "baselines"])
def test_tp2_equals_one_process(group, tmp_path):
    """Also: a DCP checkpoint of the plain model loads into the TP one and back (first case of each group),
    and (in the same two processes, to spawn them once) what TP cannot split is refused with a clear error."""
    _spawn(tp_worker.run_cases, group, str(tmp_path), group[0] == "tpa")
