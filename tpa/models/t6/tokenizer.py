"""Pairing a T6 model with its tokenizer: checks that the two agree before saving or loading."""

from __future__ import annotations

import os


def check_tokenizer_fits(config, tokenizer) -> None:
    """Raise ValueError when the tokenizer can produce ids the model has no embedding for.

    Args:
        config: a :class:`tpa.T6Config`.
        tokenizer: a transformers tokenizer.
    """
    size = len(tokenizer)
    if size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}: "
            "they do not belong together (retrain the model or pick the tokenizer it was trained with)"
        )


def save_model_and_tokenizer(model, tokenizer, path: str | os.PathLike) -> None:
    """``save_pretrained`` both into ``path`` after checking they match, and record the special tokens
    in the model config so ``generate`` knows EOS/BOS/PAD.

    The tokenizer is saved as a decoder-only model's tokenizer should be: it pads on the left (a
    batch of prompts of different lengths then ends every prompt at the last column, where
    ``generate`` continues) and its ``model_max_length`` is the model's
    ``max_position_embeddings`` (so ``truncation=True`` cuts to what the model can read).
    """
    check_tokenizer_fits(model.config, tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # save_pretrained writes the attributes init_kwargs names
    tokenizer.model_max_length = model.config.max_position_embeddings
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
            if model.generation_config is not None:
                setattr(model.generation_config, name, value)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_model_and_tokenizer(path: str | os.PathLike, **model_kwargs):
    """Load a saved T6 directory and its tokenizer (``AutoTokenizer``), checking they match."""
    from transformers import AutoTokenizer

    from tpa.models.t6.modeling_t6 import T6ForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} is not a model directory (no config.json)")
    model = T6ForCausalLM.from_pretrained(path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_tokenizer_fits(model.config, tokenizer)
    return model, tokenizer
