"""Model definitions; all transformers glue of the package lives here.

``presets`` (attention types, sizes) is plain Python; the T6 names below load :mod:`tpa.models.t6`
(and with it torch and transformers) on first use.
"""

from __future__ import annotations

import importlib

from tpa.models.presets import ATTENTION_TYPES, PRESETS

_T6_NAMES = ("T6Cache", "T6Config", "T6ForCausalLM", "T6Model")

__all__ = ["ATTENTION_TYPES", "PRESETS", *_T6_NAMES]


def __getattr__(name: str):
    if name in _T6_NAMES:
        return getattr(importlib.import_module("tpa.models.t6"), name)
    raise AttributeError(f"module 'tpa.models' has no attribute {name!r}")
