"""Tensor Product Attention (arXiv 2501.06425) and the T6 model.

``import tpa`` is cheap (neither torch nor transformers is imported): the names below load on first
use, and T6 is registered with transformers' ``AutoConfig`` and ``AutoModelForCausalLM`` as soon as
either is imported (see :mod:`tpa._auto`), so ``import tpa`` followed by
``AutoModelForCausalLM.from_pretrained(t6_dir)`` works as before.
"""

from __future__ import annotations

import importlib

from tpa import _auto

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ATTENTION_TYPES": "tpa.models.presets",
    "PRESETS": "tpa.models.presets",
    "KVCache": "tpa.cache",
    "T6Cache": "tpa.models.t6",
    "T6Config": "tpa.models.t6",
    "T6ForCausalLM": "tpa.models.t6",
    "T6Model": "tpa.models.t6",
}
_SUBPACKAGES = ("layers", "ops")

__all__ = ["ATTENTION_TYPES", "KVCache", "PRESETS", "T6Cache", "T6Config", "T6ForCausalLM", "T6Model", "layers", "ops"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"tpa.{name}")
    else:
        raise AttributeError(f"module 'tpa' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


_auto.register_when_transformers_loads()
