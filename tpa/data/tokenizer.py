"""Tokenizers for data preparation: a HuggingFace tokenizer by name or path, or a byte-level BPE
trained on the corpus with :mod:`tokenizers`.

Either way the result is a ``transformers.PreTrainedTokenizerFast`` with a ``bos_token`` and an
``eos_token`` (for a trained BPE both are ``<|endoftext|>``, as in GPT-2), saved next to the token
shards so the trained model's directory can carry it.
"""

from __future__ import annotations

from typing import Iterable

from tpa.data.sources import DataError

ENDOFTEXT = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte symbols and <|endoftext|>


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False):
    """Train a byte-level BPE (GPT-2 pre-tokenization) and wrap it as a ``PreTrainedTokenizerFast``.

    The tokenizer round-trips any text exactly: ``decode(encode(text)) == text``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE (at least {MIN_BPE_VOCAB})")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str):
    """Load a HuggingFace tokenizer (local directory or hub name); it must have a bos or eos token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load tokenizer {name_or_path!r}: {err}") from None
    if tok.bos_token_id is None and tok.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has neither a bos nor an eos token; documents need a separator")
    return tok


def separator_id(tok) -> int:
    """The token that starts every document in the shards: bos if the tokenizer has one, else eos."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (fast tokenizers batch in Rust)."""
    return tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
