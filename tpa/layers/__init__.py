"""Attention layers with one call signature: ``layer(hidden_states [B, T, C], ctx) -> [B, T, C]``."""

from tpa.layers.base import Attention, AttentionContext
from tpa.layers.mha import MultiHeadAttention
from tpa.layers.mla import MultiHeadLatentAttention
from tpa.layers.tpa import TensorProductAttention

__all__ = [
    "Attention",
    "AttentionContext",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "TensorProductAttention",
]
