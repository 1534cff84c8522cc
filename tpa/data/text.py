"""Text in bounded pieces: byte blocks decoded as UTF-8 across block boundaries, and cuts at the
boundaries of a tokenizer's pre-tokenization, so that a tokenizer given the pieces one by one gives
the tokens of the whole text while holding only a piece at a time."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from tpa.data.errors import DataError

# Longest piece of text tokenized at once (characters): bounds the tokenizer's memory, which is
# ~250x the text it is given, whatever the size of a document.
PIECE_CHARS = 1 << 18


# A cut is taken only where the pre-tokenization of a window of text is that of the whole text: at the
# start of a pre-token that begins at least this many characters before the window's end.
CUT_MARGIN = 64
# A run of text without such a cut (one pre-token, e.g. a long word) longer than this cannot be
# tokenized exactly in bounded memory: it is refused.
MAX_UNCUT_CHARS = 1 << 21


class UncutText(DataError):
    """A stretch of text too long to tokenize without a pre-token boundary in it."""


class PieceCutter:
    """Cuts text into pieces of at most ``max_chars`` characters at boundaries of a tokenizer's
    pre-tokenization (a :mod:`tokenizers` pre-tokenizer: byte-level BPE, Metaspace, a regex split),
    so that a tokenizer given the pieces one by one gives the tokens of the whole text (checked by
    :func:`tpa.data.tokenizer.piece_cutter` before a tokenizer's pieces are trusted). A piece is
    longer than ``max_chars`` only when the text has no boundary in it; more than
    ``MAX_UNCUT_CHARS`` without one is an :class:`UncutText` error."""

    def __init__(self, pre_tokenizer, max_chars: int = PIECE_CHARS, margin: int = CUT_MARGIN):
        self.pre_tokenizer, self.max_chars, self.margin = pre_tokenizer, max_chars, margin

    def cut(self, text: str, start: int, final: bool) -> int:
        """A boundary ``start < cut <= start + max_chars`` of ``text[start:]`` (which begins at a boundary),
        the last one there is; a longer stretch when there is none; 0 when ``text`` may have to grow."""
        if len(text) - start <= self.max_chars and final:
            return len(text)
        window = self.max_chars + self.margin
        while True:
            end = min(len(text), start + window)
            trusted = end if final and end == len(text) else end - self.margin
            limit = min(trusted, start + max(self.max_chars, window - self.margin))
            starts = self._starts(text, start, end)
            found = [j for j, b in enumerate(starts) if start < b <= limit]
            # the last boundary within max_chars, or (none there: a longer window) the first one after
            for j in (found if window > self.max_chars + self.margin else found[::-1])[:64]:
                if self._ends_alike(text, starts, j):
                    return starts[j]
            if end == len(text):
                if len(text) - start > MAX_UNCUT_CHARS:
                    raise UncutText(f"more than {MAX_UNCUT_CHARS:,} characters without a pre-token boundary "
                                    "(one word, say): that cannot be tokenized exactly in bounded memory")
                return len(text) if final else 0
            window *= 2

    def _starts(self, text: str, lo: int, hi: int) -> list[int]:
        """Where the pre-tokens of ``text[lo:hi]`` start (indices of ``text``)."""
        return [lo + a for _, (a, _) in self.pre_tokenizer.pre_tokenize_str(text[lo:hi])]

    def _ends_alike(self, text: str, starts: list[int], j: int) -> bool:
        """Whether a text that ends at ``starts[j]`` ends in the same pre-tokens: not so for a run of
        spaces that GPT-2's pre-tokenization splits before a word (``\\s+(?!\\S)``)."""
        lo = starts[max(0, j - 2)]
        return self._starts(text, lo, starts[j]) == starts[max(0, j - 2) : j]

    def pieces(self, text: str) -> Iterator[str]:
        """The pieces of ``text``, non-empty."""
        start = 0
        while start < len(text):
            cut = self.cut(text, start, final=True)
            yield text[start:cut]
            start = cut

    def pieces_of_chunks(self, chunks: Iterable[str]) -> Iterator[str]:
        """The pieces of the text that ``chunks`` make together, holding a few chunks and pieces at a time."""
        buffer = ""
        for chunk in chunks:
            buffer += chunk
            start = 0
            while len(buffer) - start > self.max_chars + self.margin:
                cut = self.cut(buffer, start, final=False)
                if not cut:
                    break
                yield buffer[start:cut]
                start = cut
            buffer = buffer[start:]
        yield from self.pieces(buffer)


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
