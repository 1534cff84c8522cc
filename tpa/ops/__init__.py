"""Attention math on tensors: no nn.Module, no config.

``naive`` holds the einsum reference twins; ``decode`` the FlashTPA decoding op.
"""

from tpa.ops.decode import tpa_decode
from tpa.ops.naive import gather_paged, materialize, tpa_attention_factors, tpa_decode_reference

__all__ = ["gather_paged", "materialize", "tpa_attention_factors", "tpa_decode", "tpa_decode_reference"]
