"""The T6 cache as a ``transformers.Cache``, so ``generate()`` carries the factor cache.

It wraps :class:`tpa.cache.KVCache` (which holds, per layer, only what the attention type needs:
TPA factors, K/V, or MLA latents) and answers the questions ``generate()`` asks: how many input
columns were consumed, how to reorder or repeat the batch for beam search.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tpa.cache import KVCache, LayerCache


class T6CacheLayer(CacheLayerMixin):
    """Adapter exposing one :class:`tpa.cache.LayerCache` to transformers' cache protocol."""

    is_compileable = False
    is_croppable = False
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
        return -1 if self.layer.owner.max_length is None else self.layer.owner.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.layer.owner.num_columns + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.layer.owner.batch_size

    def reset(self) -> None:
        self.layer.buffers.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # done once for all layers by T6Cache
        return None


class T6Cache(Cache):
    """A ragged factor/KV cache for every layer of a T6 model.

    Args:
        specs: per-layer cache specs (``layer.cache_spec()``).
        batch_size: sequences in the batch.
        capacity: initial slots per sequence (grows by doubling).
        max_length: ``max_position_embeddings``.
    """

    def __init__(self, specs, batch_size: int, capacity: int = 256, max_length: int | None = None):
        self.kv = KVCache(specs, batch_size=batch_size, capacity=capacity, max_length=max_length)
        super().__init__(layers=[T6CacheLayer(layer) for layer in self.kv.layers])

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int = 256) -> "T6Cache":
        base = getattr(model, "model", model)  # T6ForCausalLM or T6Model
        specs = [block.self_attn.cache_spec() for block in base.layers]
        return cls(specs, batch_size, capacity=capacity, max_length=model.config.max_position_embeddings)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.num_columns

    def elements_per_token(self) -> list[int]:
        """Cached numbers per token for each layer, measured on the tensors the cache holds."""
        out = []
        for layer in self.kv.layers:
            total = sum(buf[0, 0].numel() for buf in layer.buffers.values()) if layer.buffers else None
            out.append(total if total is not None else layer.elements_per_token())
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
        raise NotImplementedError("cropping a ragged T6 cache is not supported (assisted decoding needs it)")
