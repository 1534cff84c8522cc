"""KV caches for decoding, free of any framework glue.

One :class:`KVCache` serves a whole model. It is batch-aware and ragged: every sequence ``b`` has
its own length ``seqlens[b]``, and its cached tokens sit contiguously at slots
``0 .. seqlens[b]-1`` of each buffer. Padding tokens in a forward call (``valid == False``) are never
written, so a left- or right-padded batch of prompts becomes a packed ragged cache, and a token
decoded later lands at slot ``seqlens[b]``: exactly the layout the FlashTPA decode kernel reads
(``[B, capacity, R, X]`` buffers plus ``cache_seqlens``), with no per-step copy or transpose.

Each layer stores named tensors whose per-token shapes its attention type declares
(:meth:`tpa.layers.base.Attention.cache_spec`): for TPA ``a_k [R_k, H]``, rotated ``b_k [R_k, D]``,
``a_v [R_v, H]``, ``b_v [R_v, E]``; for MHA/GQA/MQA ``k [G, D]`` and ``v [G, D]``; for MLA the latent
``c_kv [d_c]`` and the RoPE key ``k_rope [d_R]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CacheStep", "KVCache", "LayerCache", "elements_per_token"]


def elements_per_token(spec: dict[str, tuple[int, ...]]) -> int:
    """Cached numbers per token for a spec of per-token shapes (Table 1 of the paper)."""
    return sum(math.prod(shape) for shape in spec.values())


@dataclass
class CacheStep:
    """Bookkeeping of one forward call over ``T`` new tokens, shared by all layers.

    Attributes:
        slots: ``[B, T]`` long, the cache slot of each new token (for padding tokens, the slot of
            the previous valid token or 0; nothing is written for them).
        valid: ``[B, T]`` bool, which new tokens are real (not padding).
        seqlens: ``[B]`` int32, valid cached tokens per sequence after this call.
        kv_len: ``max(seqlens)``, the number of slots attention reads.
        mask: ``[B, T, kv_len]`` bool, True where a new token may attend a cached slot (causal,
            aligned to the end of each sequence); None when every sequence has the same length and
            no new token is padding, i.e. plain causal attention aligned to the end.
        positions: ``[B, T]`` long RoPE positions of the new tokens (the slot index by default).
        all_valid: no padding among the new tokens (query i of sequence b is slot ``seqlens[b]-T+i``).
        write_index, source_index: advanced indices into the buffers and into the new tokens.
    """

    slots: torch.Tensor
    valid: torch.Tensor
    seqlens: torch.Tensor
    kv_len: int
    mask: torch.Tensor
    positions: torch.Tensor
    all_valid: bool = False
    write_index: tuple[torch.Tensor, torch.Tensor] | None = None
    source_index: tuple[torch.Tensor, torch.Tensor] | None = None

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """The entries of ``value [B, T, ...]`` to write: all of them, or the valid tokens only."""
        return value if self.source_index is None else value[self.source_index]


class LayerCache:
    """The cache of one attention layer: named buffers ``[B, capacity, *shape]``.

    Args:
        spec: name -> per-token shape, e.g. ``{"a_k": (2, 34), "b_k": (2, 64), ...}``.
        owner: the :class:`KVCache` that holds lengths and capacity.
    """

    def __init__(self, spec: dict[str, tuple[int, ...]], owner: "KVCache"):
        self.spec = dict(spec)
        self.owner = owner
        self.buffers: dict[str, torch.Tensor] = {}

    def elements_per_token(self) -> int:
        """Cached numbers per token in this layer (Table 1 of the paper)."""
        return elements_per_token(self.spec)

    def _ensure(self, name: str, like: torch.Tensor, capacity: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1] < capacity:
            new = like.new_zeros((self.owner.batch_size, capacity, *self.spec[name]))
            if buf is not None:
                new[:, : buf.shape[1]] = buf
            self.buffers[name] = buf = new
        return buf

    def update(self, step: CacheStep, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write the valid new tokens and return views of all cached tokens.

        Args:
            step: from :meth:`KVCache.begin`.
            **new: one tensor per name of the spec, ``[B, T, *shape]``.

        Returns:
            name -> ``[B, kv_len, *shape]`` views (slots beyond ``seqlens[b]`` hold stale values and
            are masked by ``step.mask``).
        """
        if set(new) != set(self.spec):
            raise ValueError(f"cache update expects tensors {sorted(self.spec)}, got {sorted(new)}")
        out = {}
        for name, value in new.items():
            expected = (self.owner.batch_size, step.valid.shape[1], *self.spec[name])
            if tuple(value.shape) != expected:
                raise ValueError(f"cache tensor {name!r} must have shape {expected}, got {tuple(value.shape)}")
            buf = self._ensure(name, value, self.owner.capacity)
            if buf.dtype != value.dtype:
                raise TypeError(f"cache tensor {name!r} is {buf.dtype}, got {value.dtype}")
            buf[step.write_index] = step.gather(value)
            out[name] = buf[:, : step.kv_len]
        return out

    def buffer(self, name: str) -> torch.Tensor:
        """The whole buffer ``[B, capacity, *shape]`` (for kernels that take ``cache_seqlens``)."""
        return self.buffers[name]

    def select(self, index: torch.Tensor) -> None:
        for name, buf in self.buffers.items():
            self.buffers[name] = buf.index_select(0, index.to(buf.device))


class KVCache:
    """A ragged, batch-aware cache for all layers of a model.

    Args:
        specs: one per layer, name -> per-token shape (see module docstring).
        batch_size: number of sequences; every call must use this batch size.
        capacity: initial slots per sequence; buffers grow by doubling when exceeded.
        max_length: optional hard limit on tokens per sequence (``max_position_embeddings``).
    """

    def __init__(
        self,
        specs: list[dict[str, tuple[int, ...]]],
        batch_size: int,
        capacity: int = 256,
        max_length: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.capacity = max(1, capacity if max_length is None else min(capacity, max_length))
        self.max_length = max_length
        self.layers = [LayerCache(spec, self) for spec in specs]
        self.seqlens: torch.Tensor | None = None  # [B] int32, created on first use on the right device
        self.positions: torch.Tensor | None = None  # [B, capacity] long, RoPE position of every slot
        self.num_columns = 0  # input columns consumed per row (padding included)

    def __len__(self) -> int:
        return len(self.layers)

    def elements_per_token(self) -> list[int]:
        return [layer.elements_per_token() for layer in self.layers]

    def get_seqlens(self, device: torch.device) -> torch.Tensor:
        if self.seqlens is None:
            self.seqlens = torch.zeros(self.batch_size, dtype=torch.int32, device=device)
        return self.seqlens

    def begin(self, valid: torch.Tensor, positions: torch.Tensor | None = None) -> CacheStep:
        """Plan where ``T`` new tokens go. One host sync per call (lengths); a second one only for
        calls with padding among the new tokens.

        Args:
            valid: ``[B, T]`` bool, False for padding tokens.
            positions: optional ``[B, T]`` explicit RoPE positions; by default a token's position is
                its slot (the number of valid tokens before it in its sequence).
        """
        if valid.dim() != 2 or valid.shape[0] != self.batch_size:
            raise ValueError(
                f"this cache was built for batch size {self.batch_size}; got inputs of batch size "
                f"{valid.shape[0] if valid.dim() else '?'}"
            )
        if positions is not None and tuple(positions.shape) != tuple(valid.shape):
            raise ValueError(f"position_ids must have shape {tuple(valid.shape)}, got {tuple(positions.shape)}")
        device = valid.device
        bsz, seq = valid.shape
        before = self.get_seqlens(device).long()
        offsets = valid.long().cumsum(dim=1)  # [B, T]: valid tokens up to and including t
        slots = (before[:, None] + offsets - 1).clamp(min=0)
        after = before + offsets[:, -1]
        stats = torch.stack([after.max(), after.min(), offsets[:, -1].min()]).tolist()  # the one sync
        kv_len, uniform, all_valid = stats[0], stats[0] == stats[1], stats[2] == seq
        if self.max_length is not None and kv_len > self.max_length:
            raise ValueError(f"sequence of {kv_len} tokens exceeds max_position_embeddings={self.max_length}")
        if kv_len > self.capacity:
            self.capacity = max(kv_len, 2 * self.capacity)
            if self.max_length is not None:
                self.capacity = min(self.capacity, self.max_length)
        if all_valid:
            write = (torch.arange(bsz, device=device)[:, None].expand(bsz, seq), slots)
            src = None
        else:
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            write, src = (b_idx, slots[b_idx, t_idx]), (b_idx, t_idx)
        step = CacheStep(
            slots=slots,
            valid=valid,
            seqlens=after.to(torch.int32),
            kv_len=max(kv_len, 1),  # an all-padding first call still reads one (masked) slot
            mask=None,
            positions=(slots if positions is None else positions).long(),
            all_valid=all_valid,
            write_index=write,
            source_index=src,
        )
        if not (all_valid and uniform):  # ragged or padded: an explicit mask
            key_idx = torch.arange(step.kv_len, device=device)
            mask = (key_idx[None, None, :] <= slots[:, :, None]) & (key_idx[None, None, :] < after[:, None, None])
            # a padding query must still see one slot, else its softmax row is empty (NaN); its output is unused
            mask[..., 0] |= ~valid
            step.mask = mask
        self._store_positions(step)
        return step

    def _store_positions(self, step: CacheStep) -> None:
        if self.positions is None or self.positions.shape[1] < self.capacity:
            new = torch.zeros(self.batch_size, self.capacity, dtype=torch.long, device=step.slots.device)
            if self.positions is not None:
                new[:, : self.positions.shape[1]] = self.positions
            self.positions = new
        self.positions[step.write_index] = step.gather(step.positions)

    def cached_positions(self, kv_len: int) -> torch.Tensor:
        """``[B, kv_len]`` RoPE positions of the cached slots."""
        return self.positions[:, :kv_len]

    def commit(self, step: CacheStep) -> None:
        """Record the new lengths once every layer has written its tokens."""
        self.seqlens = step.seqlens
        self.num_columns += step.valid.shape[1]

    def select(self, index: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) sequences: ``index [B']`` into the batch (beam search)."""
        for layer in self.layers:
            layer.select(index)
        if self.seqlens is not None:
            self.seqlens = self.seqlens.index_select(0, index.to(self.seqlens.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))
        self.batch_size = int(index.numel())

    def reset(self) -> None:
        self.seqlens = None
        self.positions = None
        self.num_columns = 0
