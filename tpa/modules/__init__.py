"""Small reusable nn.Modules: RMSNorm, rotary position embedding, SwiGLU MLP."""

from tpa.modules.mlp import SwiGLU
from tpa.modules.norm import RMSNorm
from tpa.modules.rotary import RotaryEmbedding, apply_rotary

__all__ = ["RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary"]
