"""The T6 cache as a ``transformers.Cache``, so ``generate()`` carries the factor cache.

It wraps :class:`tpa.cache.KVCache` (which holds, per layer, only what the attention type needs:
TPA factors, K/V, or MLA latents) and answers the questions ``generate()`` asks: how many input
columns were consumed, how to reorder or repeat the batch for beam search.

A static T6Cache (``static=True``: fixed capacity, device-only planning of one-token steps) on CUDA
also carries a :class:`tpa.models.t6.decode_graph.DecodeGraph` (``cuda_graphs``, on by default
there): ``T6ForCausalLM.forward`` then runs every one-token step as a replay of a captured CUDA
graph. ``generate(..., cache_implementation="static")`` builds such a cache.

``is_compileable`` stays False on purpose: transformers' ``generate`` would otherwise wrap the
forward in ``torch.compile(mode="reduce-overhead")``; the graph capture replaces that (see
:mod:`tpa.models.t6.decode_graph` for why).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tpa.cache import KVCache, LayerCache
from tpa.models.t6.decode_graph import DecodeGraph


class T6CacheLayer(CacheLayerMixin):
    """Adapter exposing one :class:`tpa.cache.LayerCache` to transformers' cache protocol."""

    is_compileable = False
    supports_early_init = False

    def __init__(self, layer: LayerCache):
        super().__init__()
        self.layer = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # storage is allocated on first write
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("T6 layers write their cache through tpa.cache.LayerCache.update")

    def get_seq_length(self) -> int:
        return self.layer.owner.num_columns

    def get_max_length(self) -> int:
        owner = self.layer.owner
        if owner.static:
            return owner.capacity
        return -1 if owner.max_length is None else owner.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.layer.owner.num_columns + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.layer.owner.batch_size

    @property
    def is_croppable(self) -> bool:  # assisted decoding rolls back rejected drafts (dynamic caches)
        return not self.layer.owner.static

    def crop(self, tokens_to_remove: int) -> None:  # done once for all layers by T6Cache
        return None

    def reset(self) -> None:
        if not self.layer.owner.static:  # static buffers stay: captured graphs read their storage
            self.layer.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # done once for all layers by T6Cache
        return None


class T6Cache(Cache):
    """A ragged factor/KV cache for every layer of a T6 model.

    Args:
        specs: per-layer cache specs (``layer.cache_spec()``).
        storage: optional per-layer allocated shapes (``layer.cache_storage()``: TPA's head factors
            padded to ``tpa_cache_head_multiple`` heads); default: the specs' shapes.
        batch_size: sequences in the batch.
        capacity: initial slots per sequence (dynamic: grows by doubling; static: fixed, counted in
            input columns, padding included).
        max_length: ``max_position_embeddings``.
        static: fixed-capacity, graph-safe decoding (see :class:`tpa.cache.KVCache`); needs ``dtype``
            and ``device``.
        dtype, device: of a static cache's buffers.
        cuda_graphs: replay one-token steps from a captured CUDA graph. ``None`` (default): on for a
            static cache on CUDA, off otherwise. ``True`` needs ``static`` and a CUDA device.
    """

    def __init__(self, specs, batch_size: int, capacity: int = 256, max_length: int | None = None, *,
                 static: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 cuda_graphs: bool | None = None, storage=None):
        self.kv = KVCache(specs, batch_size=batch_size, capacity=capacity, max_length=max_length, static=static,
                          dtype=dtype, device=device, storage=storage)
        super().__init__(layers=[T6CacheLayer(layer) for layer in self.kv.layers])
        on_cuda = static and torch.device(device).type == "cuda"
        if cuda_graphs and not static:
            raise ValueError("cuda_graphs needs a static cache (static=True): a graph replays fixed shapes")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, the cache is on {device}")
        use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.decode_graph: DecodeGraph | None = DecodeGraph(self) if use_graphs else None

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int = 256, *, static: bool = False,
                  cuda_graphs: bool | None = None) -> "T6Cache":
        """A cache shaped for ``model`` (T6ForCausalLM or T6Model); a static one takes the model's
        dtype and device."""
        base = getattr(model, "model", model)  # T6ForCausalLM or T6Model
        specs = [block.self_attn.cache_spec() for block in base.layers]
        storage = [block.self_attn.cache_storage() for block in base.layers]
        extra = dict(static=True, dtype=model.dtype, device=model.device, cuda_graphs=cuda_graphs) if static else \
            dict(cuda_graphs=cuda_graphs)
        return cls(specs, batch_size, capacity=capacity, max_length=model.config.max_position_embeddings,
                   storage=storage, **extra)

    def check_fits(self, model) -> None:
        """Raise ValueError unless this cache was shaped for ``model`` (T6Model): one layer cache per
        layer, each caching the tensors (names and per-token shapes) that layer's attention caches, in
        the (padded) storage that layer's decode reads."""
        blocks = model.layers
        if len(self.kv.layers) != len(blocks):
            raise ValueError(f"the cache has {len(self.kv.layers)} layers, the model {len(blocks)}: it was built "
                             "for another model; make one with T6Cache.for_model(model, batch_size)")
        for i, (layer, block) in enumerate(zip(self.kv.layers, blocks)):
            want = {name: tuple(shape) for name, shape in block.self_attn.cache_spec().items()}
            if {name: tuple(shape) for name, shape in layer.spec.items()} != want:
                raise ValueError(f"the cache's layer {i} holds {layer.spec}, the model's layer {i} "
                                 f"({type(block.self_attn).__name__}) caches {want}: it was built for another "
                                 "model; make one with T6Cache.for_model(model, batch_size)")
            want = {name: tuple(shape) for name, shape in block.self_attn.cache_storage().items()}
            if {name: tuple(shape) for name, shape in layer.storage.items()} != want:
                raise ValueError(f"the cache's layer {i} stores {layer.storage} per token, the model's layer {i} "
                                 f"reads {want} (tpa_cache_head_multiple pads the head factors): make the cache "
                                 "with T6Cache.for_model(model, batch_size)")

    @property
    def static(self) -> bool:
        return self.kv.static

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.num_columns

    def elements_per_token(self) -> list[int]:
        """Cached numbers per token for each layer (Table 1), measured on the views the cache's readers
        get (``tpa_cache_head_multiple``'s padding left out: :meth:`stored_elements_per_token`)."""
        return self._measured("views", [layer.elements_per_token() for layer in self.kv.layers])

    def stored_elements_per_token(self) -> list[int]:
        """Numbers per token each layer's buffers hold, the head factors' padding included."""
        return self._measured("buffers", self.kv.stored_elements_per_token())

    def _measured(self, attribute: str, predicted: list[int]) -> list[int]:
        """Per layer, the numbers per token of ``layer.<attribute>``'s tensors, or ``predicted``
        for a layer that holds none yet."""
        out = []
        for layer, guess in zip(self.kv.layers, predicted):
            tensors = getattr(layer, attribute)
            out.append(sum(buf[0, 0].numel() for buf in tensors.values()) if tensors else guess)
        return out

    def reset(self) -> None:
        self.kv.reset()
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.kv.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.kv.batch_size).repeat_interleave(repeats)
        self.kv.select(index)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last input columns (assisted and prompt-lookup decoding roll back rejected draft
        tokens); ragged and left-padded batches crop exactly (:meth:`tpa.cache.KVCache.crop`).

        Args:
            tokens_to_remove: ``-n`` (or 0) removes the last ``n`` input columns, as transformers'
                caches take it; a positive value is the number of columns to keep (the older
                convention of ``crop(max_length)``).

        Raises:
            ValueError: a static cache, or more columns than the cache holds.
        """
        keep = tokens_to_remove if tokens_to_remove > 0 else self.kv.num_columns + tokens_to_remove
        self.kv.crop(keep)
