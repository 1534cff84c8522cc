"""Model definitions; all transformers glue of the package lives here."""

from tpa.models.t6 import ATTENTION_TYPES, PRESETS, T6Cache, T6Config, T6ForCausalLM, T6Model

__all__ = ["ATTENTION_TYPES", "PRESETS", "T6Cache", "T6Config", "T6ForCausalLM", "T6Model"]
