"""T6 as a transformers model; importing this registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from tpa.models.t6.cache_t6 import T6Cache
from tpa.models.t6.configuration_t6 import ATTENTION_TYPES, PRESETS, T6Config
from tpa.models.t6.loading import (check_model_dir, check_tokenizer_fits, load_model_and_tokenizer,
                                   save_model_and_tokenizer)
from tpa.models.t6.modeling_t6 import T6ForCausalLM, T6ForSequenceClassification, T6Model, T6PreTrainedModel

AutoConfig.register(T6Config.model_type, T6Config, exist_ok=True)
AutoModel.register(T6Config, T6Model, exist_ok=True)
AutoModelForCausalLM.register(T6Config, T6ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(T6Config, T6ForSequenceClassification, exist_ok=True)

__all__ = [
    "ATTENTION_TYPES",
    "PRESETS",
    "T6Cache",
    "T6Config",
    "T6ForCausalLM",
    "T6ForSequenceClassification",
    "T6Model",
    "T6PreTrainedModel",
    "check_model_dir",
    "check_tokenizer_fits",
    "load_model_and_tokenizer",
    "save_model_and_tokenizer",
]
