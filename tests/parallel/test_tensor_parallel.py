"""Tensor parallelism on CPUs (gloo, 2 spawned ranks): forward, every gradient, cached decoding and greedy
generation equal one process for every attention type (float32, relative error <= 1e-5); each rank holds
1/N of the fused projections' head rows; the per-rank cache holds R(H/N + D) numbers per token for TPA;
output_attentions returns all heads; DCP checkpoints move between TP and one process; bad head counts give
clear errors that name what would work."""

from __future__ import annotations

import socket

import torch.multiprocessing as mp

from parallel import tp_worker


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, nprocs: int = 2) -> None:
    mp.start_processes(fn, args=(nprocs, _port(), *args), nprocs=nprocs, start_method="spawn", join=True)


def test_tp2_equals_one_process(tmp_path):
    """Every attention type in one spawn of two ranks (to start them once). Also: a DCP checkpoint of the
    plain model loads into the TP one and back (for TPA, MLA, GQA and MQA), the fused projections hold 1/N of
    their head rows per rank, output_attentions gives all heads, and what TP cannot split is refused with
    a clear error."""
    _spawn(tp_worker.run_cases, list(tp_worker.CASES), str(tmp_path), True)
