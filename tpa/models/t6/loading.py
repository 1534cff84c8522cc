"""Saving and loading a model with its tokenizer: checks that the two agree before saving or loading.

Loading is the one path of every command that reads a model directory (``tpa generate``, ``tpa eval``,
``tpa bench``), for T6 and any other transformers causal LM."""

from __future__ import annotations

import os
from pathlib import Path

from tpa.utils.args import UsageError


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


def check_model_dir(path: str | os.PathLike) -> Path:
    """The folder must hold a HuggingFace ``config.json``; otherwise a clear :class:`UsageError`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UsageError(f"{str(path)!r} is a file, not a model directory (save_pretrained output)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is not a model directory: it has no config.json "
                         "(expected the output of save_pretrained or `tpa train`'s RUN_DIR/final)")
    return path


def load_model_and_tokenizer(path: str | os.PathLike, device=None, dtype=None, **model_kwargs):
    """Load a saved causal LM (T6 or any transformers model) and its tokenizer, checking they match;
    the model in eval mode, on ``device`` when given, in ``dtype`` when given.

    Raises:
        UsageError (a ValueError): not a model directory, no tokenizer in it, a model that does not
            load, or a tokenizer with ids beyond the model's vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"{str(path)!r} holds no loadable tokenizer ({err}); save one with "
                         "tpa.models.t6.save_model_and_tokenizer") from None
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"could not load a causal language model from {str(path)!r}: {err}") from None
    try:
        check_tokenizer_fits(model.config, tokenizer)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def model_label(path: str | os.PathLike) -> str:
    """A short name for a model directory: its folder name, with the run's name in front for
    ``tpa train`` exports (``RUN_DIR/final`` -> ``RUN/final``)."""
    p = Path(path).resolve()
    return f"{p.parent.name}/{p.name}" if p.name == "final" else p.name
