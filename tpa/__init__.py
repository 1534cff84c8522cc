"""Tensor Product Attention (arXiv 2501.06425) and the T6 model.

``import tpa`` registers T6 with transformers' ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

__version__ = "0.1.0"

from tpa import layers, ops
from tpa.cache import KVCache
from tpa.models import ATTENTION_TYPES, PRESETS, T6Cache, T6Config, T6ForCausalLM, T6Model

__all__ = ["ATTENTION_TYPES", "KVCache", "PRESETS", "T6Cache", "T6Config", "T6ForCausalLM", "T6Model", "layers", "ops"]
