"""Text in bounded pieces: byte blocks decoded as UTF-8 across block boundaries, and cuts at the
boundaries of GPT-2-style pre-tokenization, so that a tokenizer given the pieces one by one gives
the tokens of the whole text while holding only a piece at a time."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

# Longest piece of text tokenized at once (characters): bounds the tokenizer's memory, which is
# ~250x the text it is given, whatever the size of a document.
PIECE_CHARS = 1 << 18


def iter_pieces(text: str, max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``max_chars``, each cut (where there is one) just before a single
    space between two non-space characters: a boundary of GPT-2-style pre-tokenization, so a
    byte-level BPE gives the same tokens for the pieces as for the whole text. Text without such a
    space is cut at ``max_chars``."""
    start = 0
    while len(text) - start > max_chars:
        lo = start + max_chars // 2
        cut = start + max_chars + 1  # a space at start + max_chars ends a piece of exactly max_chars
        while True:
            cut = text.rfind(" ", lo, cut)
            if cut <= lo or _word_boundary(text, cut):
                break
        if cut <= lo:
            cut = start + max_chars
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """:func:`iter_pieces` as a list."""
    return list(iter_pieces(text, max_chars))


def _word_boundary(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()


def pieces_of_chunks(chunks: Iterable[str], max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text that ``chunks`` make together, in non-empty pieces as :func:`iter_pieces` cuts them,
    holding at most one chunk and one piece at a time."""
    buffer = ""
    for chunk in chunks:
        if not chunk:
            continue
        *done, buffer = iter_pieces(buffer + chunk, max_chars)
        yield from done
    if buffer:
        yield buffer


def decode_blocks(blocks: Iterable[bytes], note_replaced: Callable[[int], None] | None = None) -> Iterator[str]:
    """Decode a stream of byte blocks as UTF-8 (a sequence cut by a block boundary is joined first),
    each invalid byte sequence replaced by U+FFFD as :func:`decode_utf8` does on the whole bytes;
    ``note_replaced`` is told how many invalid bytes each block had."""
    pending = b""
    for block in blocks:
        data = pending + block
        cut = _utf8_complete(data)
        pending = data[cut:]
        text, bad = decode_utf8(data[:cut])
        if bad and note_replaced is not None:
            note_replaced(bad)
        yield text
    if pending:
        text, bad = decode_utf8(pending)
        if bad and note_replaced is not None:
            note_replaced(bad)
        yield text


def _utf8_complete(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 sequence."""
    i = len(data)
    back = 0
    while back < 3 and i - back - 1 >= 0 and data[i - back - 1] & 0xC0 == 0x80:
        back += 1
    lead_at = i - back - 1
    if lead_at < 0:
        return i
    lead = data[lead_at]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return i if back + 1 >= need else lead_at


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid byte sequence by U+FFFD; return (text, invalid byte count)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    pieces: list[str] = []
    bad = 0
    rest = data
    while True:
        try:
            pieces.append(rest.decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            pieces.append(rest[: err.start].decode("utf-8"))
            pieces.append("\ufffd")
            bad += err.end - err.start
            rest = rest[err.end :]
    return "".join(pieces), bad
