"""KV caches for decoding, free of any framework glue.

One :class:`KVCache` serves a whole model. It is batch-aware and ragged: every sequence ``b`` has
its own length ``seqlens[b]``, and its cached tokens sit contiguously at slots
``0 .. seqlens[b]-1`` of each buffer. Padding tokens in a forward call (``valid == False``) are never
counted (nor written, except by a static one-token step, which writes one at slot ``seqlens[b]``,
beyond the length, where the next token overwrites it), so a left- or right-padded batch of prompts
becomes a packed ragged cache, and a token
decoded later lands at slot ``seqlens[b]``: exactly the layout the FlashTPA decode kernel reads
(``[B, capacity, R, X]`` buffers plus ``cache_seqlens``), with no per-step copy or transpose.

Each layer stores named tensors whose per-token shapes its attention type declares
(:meth:`tpa.layers.base.Attention.cache_spec`): for TPA ``a_k [R_k, H]``, rotated ``b_k [R_k, D]``,
``a_v [R_v, H]``, ``b_v [R_v, E]``; for MHA/GQA/MQA ``k [G, D]`` and ``v [G, D]``; for MLA the latent
``c_kv [d_c]`` and the RoPE key ``k_rope [d_R]``.

A layer may store a tensor in a wider buffer than its shape (``storage``, from
:meth:`tpa.layers.base.Attention.cache_storage`): TPA's ``a_k``/``a_v`` as ``[R, ceil(H/M)*M]`` rows
for the decode kernel's aligned loads (``tpa_cache_head_multiple``). Writes fill the leading part,
the padding stays zero, and every reader (``update``, ``buffer``) gets views of the declared shape;
``LayerCache.buffers`` holds the allocated (padded) tensors, so bytes summed over it are the bytes held.

Two modes:

- dynamic (default): buffers grow by doubling; every call plans its writes with one host sync (the
  lengths), and attention reads ``max(seqlens)`` slots.
- static (``static=True``): every buffer is allocated once at a fixed capacity and never replaced,
  lengths live in one device tensor updated in place, and a one-token step (decoding) is planned on
  the device alone: no ``.item()``/``.tolist()``, no data-dependent shape. Attention then reads the
  whole capacity under a mask built from the per-sequence lengths (or, for the FlashTPA kernel,
  from ``cache_seqlens``). Such a step can be captured in a CUDA graph and replayed
  (:mod:`tpa.models.t6.decode_graph`). Calls of several tokens (prefill) keep the dynamic plan. The
  capacity counts input columns, padding included: a call of ``T`` tokens needs
  ``num_columns + T <= capacity``, a check on host integers only.
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
        write_index, source_index: advanced indices into the buffers and into the new tokens; None
            for a static step, which writes every new token (padding too) at its own slot ``slots``.
        kernel_seqlens: ``[B]`` int32 lengths for the FlashTPA decode kernel (query i of sequence b
            sees slots ``j < kernel_seqlens[b] - T + 1 + i``), or None where the kernel does not
            apply (padding among the new tokens of a dynamic step).
        key_positions: ``[B, kv_len]`` RoPE positions of the slots attention reads (set by ``begin``).
        key_cos, key_sin: ``[B, kv_len, d_rope/2]`` RoPE tables of ``key_positions``, set by the model
            when a layer rotates cached keys as it reads them (one table for all such layers); else None.
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
    kernel_seqlens: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None
    key_cos: torch.Tensor | None = None
    key_sin: torch.Tensor | None = None

    @property
    def fixed_shapes(self) -> bool:
        """A static one-token step: every shape it gives attention repeats from step to step."""
        return self.write_index is None

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """The entries of ``value [B, T, ...]`` to write: all of them, or the valid tokens only."""
        return value if self.source_index is None else value[self.source_index]

    def write(self, buf: torch.Tensor, value: torch.Tensor) -> None:
        """Write the new tokens ``value [B, T, ...]`` into ``buf [B, capacity, ...]`` in place."""
        if self.write_index is not None:
            buf[self.write_index] = self.gather(value)
        else:  # static step: one scatter along the slot axis, no host sync
            index = self.slots.reshape(*self.slots.shape, *([1] * (value.dim() - 2))).expand_as(value)
            buf.scatter_(1, index, value)


def _checked_storage(spec: dict[str, tuple[int, ...]], storage: dict[str, tuple[int, ...]] | None):
    """``storage`` (name -> allocated per-token shape) once it covers ``spec`` dimension by dimension;
    ``spec`` itself when None. Raises ValueError otherwise."""
    if storage is None:
        return spec
    storage = {name: tuple(shape) for name, shape in storage.items()}
    if set(storage) != set(spec):
        raise ValueError(f"cache storage names {sorted(storage)} must be the spec's {sorted(spec)}")
    for name, shape in spec.items():
        held = storage[name]
        if len(held) != len(shape) or any(h < n for h, n in zip(held, shape)):
            raise ValueError(f"cache storage of {name!r} must hold its per-token shape {tuple(shape)} in as many "
                             f"dimensions, each at least as large; got {held}")
    return storage


class LayerCache:
    """The cache of one attention layer: named buffers ``[B, capacity, *shape]``.

    Args:
        spec: name -> per-token shape, e.g. ``{"a_k": (2, 34), "b_k": (2, 64), ...}``.
        owner: the :class:`KVCache` that holds lengths and capacity.
        storage: optional name -> allocated per-token shape, each dimension at least the spec's
            (e.g. ``"a_k": (2, 48)``); the padding stays zero and readers see the spec's shape.

    Attributes:
        buffers: name -> the allocated ``[B, capacity, *storage[name]]`` tensor.
        views: name -> its ``[B, capacity, *spec[name]]`` view (the buffer itself when unpadded).
    """

    def __init__(self, spec: dict[str, tuple[int, ...]], owner: "KVCache",
                 storage: dict[str, tuple[int, ...]] | None = None):
        self.spec = dict(spec)
        self.storage = _checked_storage(self.spec, storage)
        self.owner = owner
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[str, torch.Tensor] = {}

    def elements_per_token(self) -> int:
        """Cached numbers per token in this layer (Table 1 of the paper)."""
        return elements_per_token(self.spec)

    def stored_elements_per_token(self) -> int:
        """Numbers per token this layer's buffers hold, padding included."""
        return elements_per_token(self.storage)

    def store(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """Hold ``buf [B, capacity, *storage[name]]`` as the buffer of ``name``; returns its view."""
        self.buffers[name] = buf
        shape = self.spec[name]
        view = buf if tuple(self.storage[name]) == tuple(shape) else buf[(slice(None), slice(None),
                                                                            *map(slice, shape))]
        self.views[name] = view
        return view

    def clear(self) -> None:
        """Drop every buffer (a dynamic cache allocates them again on its next write)."""
        self.buffers.clear()
        self.views.clear()

    def _ensure(self, name: str, like: torch.Tensor, capacity: int) -> torch.Tensor:
        """The view of the buffer of ``name`` with at least ``capacity`` slots (dynamic: grown by a copy)."""
        buf = self.buffers.get(name)
        if self.owner.static:  # allocated once by KVCache.__init__, never replaced
            return self.views[name]
        if buf is None or buf.shape[1] < capacity:
            new = like.new_zeros((self.owner.batch_size, capacity, *self.storage[name]))
            if buf is not None:
                new[:, : buf.shape[1]] = buf
            return self.store(name, new)
        return self.views[name]

    def update(self, step: CacheStep, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write the valid new tokens and return views of all cached tokens.

        Args:
            step: from :meth:`KVCache.begin`.
            **new: one tensor per name of the spec, ``[B, T, *shape]``.

        Returns:
            name -> ``[B, kv_len, *shape]`` views (slots beyond ``seqlens[b]`` hold stale values and
            are masked by ``step.mask``); for a static one-token step ``kv_len`` is the capacity,
            so these are the whole buffers (their views of the spec's shape).
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
                hint = " (a static cache takes the model's dtype when built)" if self.owner.static else ""
                raise TypeError(f"cache tensor {name!r} is {buf.dtype}, got {value.dtype}{hint}")
            if buf.device != value.device:
                raise ValueError(f"cache tensor {name!r} is on {buf.device}, got a tensor on {value.device}")
            step.write(buf, value)
            out[name] = buf[:, : step.kv_len]
        return out

    def buffer(self, name: str) -> torch.Tensor:
        """The whole buffer ``[B, capacity, *shape]`` (for kernels that take ``cache_seqlens``): a view
        ``buf[..., :H]`` of the padded buffer where the storage is padded."""
        return self.views[name]

    def select(self, index: torch.Tensor) -> None:
        for name, buf in self.buffers.items():
            if self.owner.static:  # in place: the buffers keep their storage (captured graphs read it)
                buf.copy_(buf.index_select(0, index.to(buf.device)))
            else:
                self.store(name, buf.index_select(0, index.to(buf.device)))


class KVCache:
    """A ragged, batch-aware cache for all layers of a model.

    Args:
        specs: one per layer, name -> per-token shape (see module docstring).
        storage: optional, one per layer: name -> allocated (padded) per-token shape
            (:class:`LayerCache`); default: the specs' shapes.
        batch_size: number of sequences; every call must use this batch size.
        capacity: initial slots per sequence; buffers grow by doubling when exceeded (dynamic), or
            the fixed number of slots (static). Clamped to ``max_length``.
        max_length: optional hard limit on tokens per sequence (``max_position_embeddings``).
        static: fixed capacity, buffers allocated here once, device-only planning of one-token
            steps (see the module docstring). Needs ``dtype`` and ``device``.
        dtype, device: of the static buffers (the model's); ignored by a dynamic cache, whose
            buffers take the dtype and device of the first tensors written.
    """

    def __init__(
        self,
        specs: list[dict[str, tuple[int, ...]]],
        batch_size: int,
        capacity: int = 256,
        max_length: int | None = None,
        *,
        static: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        storage: list[dict[str, tuple[int, ...]] | None] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.capacity = max(1, capacity if max_length is None else min(capacity, max_length))
        self.max_length = max_length
        self.static = static
        if storage is not None and len(storage) != len(specs):
            raise ValueError(f"cache storage must give one entry per layer ({len(specs)}), got {len(storage)}")
        storage = [None] * len(specs) if storage is None else storage
        self.layers = [LayerCache(spec, self, held) for spec, held in zip(specs, storage)]
        self.seqlens: torch.Tensor | None = None  # [B] int32, created on first use on the right device
        self.positions: torch.Tensor | None = None  # [B, capacity] long, RoPE position of every slot
        self.num_columns = 0  # input columns consumed per row (padding included)
        # which input columns held real tokens, per call ([B, T] bool each; dynamic caches, for crop)
        self._column_valid: list[torch.Tensor] = []
        self._slot_index: torch.Tensor | None = None  # [capacity] arange, for static masks
        if static:
            if dtype is None or device is None:
                raise ValueError("a static cache needs the dtype and device of its buffers (the model's)")
            device = torch.device(device)
            for layer in self.layers:
                for name, shape in layer.storage.items():
                    layer.store(name, torch.zeros((batch_size, self.capacity, *shape), dtype=dtype, device=device))
            self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self.positions = torch.zeros(batch_size, self.capacity, dtype=torch.long, device=device)
            self._slot_index = torch.arange(self.capacity, device=device)

    def __len__(self) -> int:
        return len(self.layers)

    def elements_per_token(self) -> list[int]:
        return [layer.elements_per_token() for layer in self.layers]

    def stored_elements_per_token(self) -> list[int]:
        """Numbers per token each layer's buffers hold, padding included."""
        return [layer.stored_elements_per_token() for layer in self.layers]

    def get_seqlens(self, device: torch.device) -> torch.Tensor:
        if self.seqlens is None:
            self.seqlens = torch.zeros(self.batch_size, dtype=torch.int32, device=device)
        return self.seqlens

    def check_room(self, new_columns: int) -> None:
        """Raise unless a static cache has room for ``new_columns`` more input columns (host check only)."""
        if self.static and self.num_columns + new_columns > self.capacity:
            limit = "" if self.max_length is None or self.capacity < self.max_length else \
                f" (max_position_embeddings={self.max_length})"
            raise ValueError(
                f"static cache full: {self.num_columns} input columns held + {new_columns} new exceed its capacity of "
                f"{self.capacity}{limit}; build the cache with capacity >= prompt width + max_new_tokens"
            )

    def begin(self, valid: torch.Tensor, positions: torch.Tensor | None = None) -> CacheStep:
        """Plan where ``T`` new tokens go.

        Dynamic cache: one host sync per call (lengths); a second one only for calls with padding
        among the new tokens. Static cache: a one-token call is planned on the device without any
        sync (:meth:`_begin_static`); longer calls take the dynamic plan within the fixed capacity.

        Args:
            valid: ``[B, T]`` bool, False for padding tokens.
            positions: optional ``[B, T]`` explicit RoPE positions; by default a token's position is
                its slot (the number of valid tokens before it in its sequence).

        Raises:
            ValueError: a batch size other than the cache's, mis-shaped positions, a sequence beyond
                ``max_length``, or (static) more input columns than the capacity.
        """
        if valid.dim() != 2 or valid.shape[0] != self.batch_size:
            raise ValueError(
                f"this cache was built for batch size {self.batch_size}; got inputs of batch size "
                f"{valid.shape[0] if valid.dim() else '?'}"
            )
        if positions is not None and tuple(positions.shape) != tuple(valid.shape):
            raise ValueError(f"position_ids must have shape {tuple(valid.shape)}, got {tuple(positions.shape)}")
        self.check_room(valid.shape[1])
        if self.static and valid.shape[1] == 1:
            return self._begin_static(valid, positions)
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
        if kv_len > self.capacity:  # never for a static cache (check_room bounds every length)
            self.capacity = max(kv_len, 2 * self.capacity)
            if self.max_length is not None:
                self.capacity = min(self.capacity, self.max_length)
        if all_valid:
            write = (torch.arange(bsz, device=device)[:, None].expand(bsz, seq), slots)
            src = None
        else:
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            write, src = (b_idx, slots[b_idx, t_idx]), (b_idx, t_idx)
        seqlens = after.to(torch.int32)
        step = CacheStep(
            slots=slots,
            valid=valid,
            seqlens=seqlens,
            kv_len=max(kv_len, 1),  # an all-padding first call still reads one (masked) slot
            mask=None,
            positions=(slots if positions is None else positions).long(),
            all_valid=all_valid,
            write_index=write,
            source_index=src,
            kernel_seqlens=seqlens if all_valid else None,
        )
        if not (all_valid and uniform):  # ragged or padded: an explicit mask
            key_idx = torch.arange(step.kv_len, device=device)
            mask = (key_idx[None, None, :] <= slots[:, :, None]) & (key_idx[None, None, :] < after[:, None, None])
            # a padding query must still see one slot, else its softmax row is empty (NaN); its output is unused
            mask[..., 0] |= ~valid
            step.mask = mask
        self._store_positions(step)
        return step

    def _begin_static(self, valid: torch.Tensor, positions: torch.Tensor | None) -> CacheStep:
        """Plan a one-token step of a static cache on the device: fixed shapes, no host sync.

        The token of sequence b goes to slot ``seqlens[b]``, padding or not; a padding token is not
        counted (``seqlens`` does not advance), so the next token overwrites it. Attention reads all
        ``capacity`` slots under the mask ``[B, 1, capacity]``: slot j is visible iff
        ``j < seqlens_after[b]`` (slot 0 also for a padding query, whose output is unused).
        """
        before = self.seqlens.long()  # [B]
        slots = before[:, None]  # [B, 1]; < capacity, since seqlens <= num_columns < capacity
        after = before + valid[:, 0].long()
        mask = self._slot_index[None, None, :] < after[:, None, None]  # [B, 1, capacity]
        mask[..., 0] |= ~valid
        step = CacheStep(
            slots=slots,
            valid=valid,
            seqlens=after.to(torch.int32),
            kv_len=self.capacity,
            mask=mask,
            positions=(slots if positions is None else positions).long(),
            all_valid=False,  # not known on the host
            # a padding token of an empty sequence still reads one (finite) slot: its own
            kernel_seqlens=after.clamp(min=1).to(torch.int32),
        )
        self._store_positions(step)
        return step

    def _store_positions(self, step: CacheStep) -> None:
        if self.positions is None or self.positions.shape[1] < self.capacity:
            new = torch.zeros(self.batch_size, self.capacity, dtype=torch.long, device=step.slots.device)
            if self.positions is not None:
                new[:, : self.positions.shape[1]] = self.positions
            self.positions = new
        step.write(self.positions, step.positions)
        step.key_positions = self.positions[:, : step.kv_len]

    def cached_positions(self, kv_len: int) -> torch.Tensor:
        """``[B, kv_len]`` RoPE positions of the cached slots."""
        return self.positions[:, :kv_len]

    def commit(self, step: CacheStep) -> None:
        """Record the new lengths once every layer has written its tokens."""
        if self.static:
            self.seqlens.copy_(step.seqlens)  # in place: the tensor's storage is part of captured graphs
        else:
            self.seqlens = step.seqlens
            self._column_valid.append(step.valid)
        self.num_columns += step.valid.shape[1]

    def column_valid(self) -> torch.Tensor | None:
        """``[B, num_columns]`` bool: which input columns held real tokens (dynamic cache), or None
        before the first call."""
        if len(self._column_valid) > 1:
            self._column_valid = [torch.cat(self._column_valid, dim=1)]
        return self._column_valid[0] if self._column_valid else None

    def crop(self, num_columns: int) -> None:
        """Forget every token of the input columns from ``num_columns`` on (speculative decoding rolls
        back rejected draft tokens): each sequence keeps the valid tokens of its first ``num_columns``
        columns, so left-padded and ragged batches crop exactly. The slots beyond the new lengths
        keep stale values, which the next call overwrites.

        Raises:
            ValueError: a static cache (its lengths may live in a captured CUDA graph's bookkeeping),
                or ``num_columns`` outside ``[0, self.num_columns]``.
        """
        if num_columns == self.num_columns:
            return
        if self.static:
            raise ValueError("a static T6 cache cannot be cropped (assisted and prompt-lookup decoding need the "
                             "dynamic cache: leave cache_implementation unset)")
        if not 0 <= num_columns <= self.num_columns:
            raise ValueError(f"cannot crop a cache of {self.num_columns} input columns to {num_columns}")
        history = self.column_valid()
        removed = history[:, num_columns:].sum(dim=1, dtype=torch.int32)
        self.seqlens = self.seqlens - removed.to(self.seqlens.device)
        self._column_valid = [history[:, :num_columns]] if num_columns else []
        self.num_columns = num_columns

    def select(self, index: torch.Tensor) -> None:
        """Keep (or reorder, or repeat) sequences: ``index [B']`` into the batch (beam search).

        A static cache keeps its batch size and storage: only reordering (``B' == B``) is possible.
        """
        if self.static and int(index.numel()) != self.batch_size:
            raise ValueError(
                f"a static cache keeps its batch size ({self.batch_size}); cannot select {int(index.numel())} sequences"
            )
        for layer in self.layers:
            layer.select(index)
        history = None if self.static else self.column_valid()
        if history is not None:
            self._column_valid = [history.index_select(0, index.to(history.device))]
        for name in ("seqlens", "positions"):
            value = getattr(self, name)
            if value is None:
                continue
            chosen = value.index_select(0, index.to(value.device))
            if self.static:
                value.copy_(chosen)
            else:
                setattr(self, name, chosen)
        self.batch_size = int(index.numel())

    def reset(self) -> None:
        """Forget every cached token (a static cache keeps its buffers, zeroing the lengths)."""
        if self.static:
            self.seqlens.zero_()
        else:
            self.seqlens = None
            self.positions = None
        self._column_valid = []
        self.num_columns = 0
