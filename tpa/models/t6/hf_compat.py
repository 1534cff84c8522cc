"""The name under which the installed transformers passes and returns the cache.

transformers 5.24 renamed the cache argument of ``forward``/``generate`` and the cache field of
model outputs from ``past_key_values`` to ``cache`` (the old name is a deprecated alias until
5.40/6.0). T6 accepts both names in ``forward``; everything that talks to transformers (``generate``
keyword arguments, ``model_kwargs`` keys, output fields) uses :data:`CACHE_NAME`, the name the
installed version reads, so that neither side of the rename warns or drops the cache.
"""

from __future__ import annotations

import dataclasses

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAME: str = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
"""``"cache"`` on transformers >= 5.24, ``"past_key_values"`` before."""

OTHER_CACHE_NAME: str = "past_key_values" if CACHE_NAME == "cache" else "cache"


def pick_cache(cache, past_key_values):
    """The one cache a caller passed under either name.

    Raises:
        ValueError: both names given.
    """
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(output):
    """The cache field of a transformers model output, read without a deprecation warning."""
    return getattr(output, CACHE_NAME)


def cache_kwargs(cache) -> dict:
    """``{CACHE_NAME: cache}``: keyword arguments that hand ``cache`` to ``generate()`` or to a
    transformers model of the installed version."""
    return {CACHE_NAME: cache}
