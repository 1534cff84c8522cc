"""Checkpoints that hold everything an exact resume needs, written atomically.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_00001000/``::

    state/            model and optimizer through torch.distributed.checkpoint (DCP): every rank writes
                      its own shards (FSDP2) or the deduplicated replicas (DDP, one process); DCP
                      checkpoints load under any other world size or parallelism
    rng/rank_00000.pt the RNG states of each rank (torch CPU and CUDA, numpy, python)
    trainer.pt        step, tokens seen, scheduler state, data position, config, world size

It is written into ``.step_00001000.tmp`` and renamed into place once every rank has finished, so a
``step_*`` folder is always complete; a write killed half-way leaves only a ``.tmp`` folder that the
next save deletes and that :func:`latest_checkpoint` never returns. The newest ``keep`` checkpoints
are kept.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_NAME = re.compile(r"^step_(\d{8})$")


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        if not _is_dist():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "trainer.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _before_publish(tmp: Path) -> None:
    """Everything is written; the rename comes next. (A seam where tests kill the process.)"""


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    """Write a checkpoint collectively (every rank calls this) and return its final path."""
    rank = _rank()
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".{checkpoint_name(step)}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer.pt")
        _fsync_tree(tmp)
        _before_publish(tmp)
        if final.exists():  # the same step saved again (e.g. halted right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    """Step, tokens, scheduler and data state, configs and world size of a checkpoint."""
    return torch.load(path / "trainer.pt", weights_only=False)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model, optimizer and this rank's RNG states in place; return the trainer state."""
    trainer_state = read_trainer_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = _rank()
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank < trainer_state.get("world_size", 1):
        raise FileNotFoundError(f"{rng_file} is missing from a checkpoint written by {trainer_state['world_size']} ranks")
    return trainer_state
