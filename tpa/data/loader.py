"""Reading token shards for training: memory-mapped, deterministic, resumable, rank-aware.

Training batches are windows of ``seq_len + 1`` tokens (inputs and the next-token targets) taken
from the concatenated train shards. Each epoch cuts the stream into windows at a seeded random shift
and visits them in a seeded random order, so the whole data position is one integer,
:attr:`TrainBatches.position`: the number of sequences consumed, summed over every rank. Global batch
``k`` is the same set of sequences whatever the number of ranks, micro-batch size or gradient
accumulation; rank ``r`` of ``W`` takes the ``r``-th contiguous slice of it. This is what makes a
2-process run reproduce a 1-process run and a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tpa.data.prepare import DTYPES, read_meta
from tpa.data.sources import DataError


class TokenShards:
    """The token shards of one split, memory-mapped and addressed as one array."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.meta = read_meta(data_dir)
        if split not in self.meta["splits"]:
            raise DataError(f"{data_dir} has no split {split!r} (has {sorted(self.meta['splits'])})")
        dtype = DTYPES[self.meta["dtype"]]
        self.arrays = []
        for shard in self.meta["splits"][split]["shards"]:
            path = Path(data_dir) / shard["file"]
            expected = shard["tokens"] * np.dtype(dtype).itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path} is missing or not {expected} bytes long; prepare the data again")
            if shard["tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, across shard boundaries."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range 0..{self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self.starts[i])
            take = min(length - done, len(self.arrays[i]) - lo)
            out[done : done + take] = self.arrays[i][lo : lo + take]
            done += take
            i += 1
        return out


class TrainBatches:
    """Seeded, epoch-shuffled windows of ``seq_len + 1`` tokens; resumable through :attr:`position`."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int, position: int = 0):
        if shards.num_tokens < 2 * seq_len:
            raise DataError(f"the train split has {shards.num_tokens} tokens, fewer than 2 x seq_len = {2 * seq_len}")
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.windows_per_epoch = (shards.num_tokens - seq_len) // seq_len
        self.position = position
        self._epoch = -1
        self._order: np.ndarray | None = None
        self._shift = 0

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._shift = int(rng.integers(self.seq_len))
            self._order = rng.permutation(self.windows_per_epoch)
            self._epoch = epoch

    def sequence(self, index: int) -> np.ndarray:
        """The ``index``-th sequence of the whole (infinite) stream."""
        epoch, k = divmod(index, self.windows_per_epoch)
        self._load_epoch(epoch)
        start = self._shift + int(self._order[k]) * self.seq_len
        return self.shards.read(start, self.seq_len + 1)

    @property
    def epoch(self) -> float:
        return self.position / self.windows_per_epoch

    def next_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's slice ``[global_batch // world_size, seq_len + 1]`` of the next global batch."""
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        per_rank = global_batch // world_size
        first = self.position + rank * per_rank
        rows = np.stack([self.sequence(first + j) for j in range(per_rank)])
        self.position += global_batch
        return torch.from_numpy(rows)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "windows_per_epoch"):
            if state[key] != getattr(self, key):
                raise DataError(f"checkpoint data state has {key}={state[key]}, this run {getattr(self, key)}: "
                                "resume with the same data and seq_len")
        self.position = int(state["position"])


def val_sequences(shards: TokenShards, seq_len: int, max_sequences: int) -> int:
    """How many validation windows of ``seq_len + 1`` tokens there are (at most ``max_sequences``)."""
    available = (shards.num_tokens - 1) // seq_len
    if available < 1:
        raise DataError(f"the val split has {shards.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return min(available, max_sequences)


def val_batch(shards: TokenShards, seq_len: int, indices: range) -> torch.Tensor:
    """Validation windows ``indices`` (non-overlapping, in order, the same at every evaluation)."""
    return torch.from_numpy(np.stack([shards.read(i * seq_len, seq_len + 1) for i in indices]))
