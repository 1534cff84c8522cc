"""Tokenizers for data preparation: a HuggingFace tokenizer by name or path, or a byte-level BPE
trained on the corpus with :mod:`tokenizers`.

Either way the result is a ``transformers.PreTrainedTokenizerFast`` with a ``bos_token`` and an
``eos_token`` (for a trained BPE both are ``<|endoftext|>``, as in GPT-2), saved next to the token
shards so the trained model's directory can carry it.
"""

from __future__ import annotations

from typing import Iterable

from tpa.data.errors import DataError
from tpa.data.text import PIECE_CHARS, PieceCutter

ENDOFTEXT = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte symbols and <|endoftext|>


def bpe_pre_tokenizer():
    """GPT-2's byte-level pre-tokenization, that of the BPE trained by :func:`train_bpe`."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False):
    """Train a byte-level BPE (GPT-2 pre-tokenization) and wrap it as a ``PreTrainedTokenizerFast``.

    The tokenizer round-trips any text exactly: ``decode(encode(text)) == text``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small for a byte-level BPE (at least {MIN_BPE_VOCAB})")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = bpe_pre_tokenizer()
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


# Text of many kinds (scripts, digits, punctuation, contractions, runs of spaces and newlines, emoji,
# combining marks) on which a tokenizer's pieces are compared with its whole-text tokens.
_PROBE = "".join(
    f"{w}{sep}" for w, sep in zip(
        ("The", "king's", "men", "don't", "12345", "x=y+z;", "héllo", "wörld", "日本語の文", "😀😀", "e\u0301",
         "naïve", "--", "A.B.C", "tab", "Ω≈ç", "I'M", "we'll", "3.14159", "(nested)", "'quoted'", "ĠĊ") * 12,
        (" ", "  ", "\n", " ", "\n\n", "\t", " ", "   ", "", " ", "\r\n", " ", ", ", " \n ", " ", "", " ", ". ",
         "\t\t", " ", "\n", "    ") * 12))


def piece_cutter(tok, max_chars: int = PIECE_CHARS) -> PieceCutter | None:
    """A :class:`PieceCutter` at ``tok``'s pre-token boundaries, if ``tok`` has a pre-tokenizer and gives
    the same tokens for the cut pieces of a probe text as for the whole probe; else None (a document is
    then tokenized whole)."""
    backend = getattr(tok, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    if pre is None:
        return None
    probe = PieceCutter(pre, max_chars=24, margin=16)
    pieces = list(probe.pieces(_PROBE))
    whole = encode_batch(tok, [_PROBE])[0]
    if "".join(pieces) != _PROBE or [t for ids in encode_batch(tok, pieces) for t in ids] != whole:
        return None
    return PieceCutter(pre, max_chars=max_chars)
