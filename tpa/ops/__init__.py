"""Attention math on tensors: no nn.Module, no config.

``naive`` holds the einsum reference twins; ``decode`` the FlashTPA decoding op (``decode_launch``
its host side: launch plans, kernel handles, the ``triton_op``); ``fused_materialize`` the fused op
forming Q, K, V from their factors (training and prefill); ``step_write`` RoPE and the cache write of a
static one-token decode step in one launch. The Triton kernels live in ``kernels``,
imported only where Triton is installed; ``triton_support`` holds what their host sides share.
"""

from tpa.ops.decode import tpa_decode
from tpa.ops.fused_materialize import tpa_materialize, tpa_materialize_many
from tpa.ops.naive import gather_paged, materialize, tpa_attention_factors, tpa_decode_reference

__all__ = [
    "gather_paged", "materialize", "tpa_attention_factors", "tpa_decode", "tpa_decode_reference", "tpa_materialize",
    "tpa_materialize_many",
]
