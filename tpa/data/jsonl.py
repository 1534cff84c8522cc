"""JSON Lines with memory that does not grow with a line's length.

A line of at most ``WHOLE_LINE_BYTES`` is parsed whole with :func:`json.loads`. A longer one is read
in blocks of ``BLOCK_BYTES``, twice and never whole:

1. a scan finds where each string starts and ends (an ASCII quote not escaped by an odd run of
   backslashes; UTF-8 never puts ASCII bytes inside a multi-byte character) and builds the line's
   *skeleton*: the line with the content of every string longer than ``LONG_STRING_BYTES`` replaced
   by a marker. :func:`json.loads` parses the skeleton, so the structure is checked and the record
   found exactly as for a short line; the long strings other than the text field are then decoded
   block by block (checked, and their undecodable bytes counted) and dropped;
2. the text field, when it is a long string, is read again from the file when it is tokenized and
   decoded block by block: each block of the string's JSON source is cut where no escape sequence
   (a ``\\uD8xx\\uDCxx`` surrogate pair counting as one) is cut, and decoded by :func:`json.loads`.

So the text, the checks and the counts are those of :func:`json.loads` on the whole line, with at
most ``SKELETON_BYTES`` (the line without its long strings) and a few blocks in memory.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tpa.data.errors import DataError
from tpa.data.text import decode_blocks, decode_utf8

WHOLE_LINE_BYTES = 1 << 23  # lines up to 8 MB are parsed whole
LONG_STRING_BYTES = 1 << 16  # in a longer line, strings of more than 64 KB are read in blocks
SKELETON_BYTES = 1 << 26  # what a long line holds outside its long strings: at most 64 MB
BLOCK_BYTES = 1 << 20

_MARKER = f"\x00tpa-long-string-{secrets.token_hex(16)}-"  # cannot collide with a string of the input
_SURROGATE_PAIR = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def iter_records(path: Path, text_field: str, note_replaced: Callable[[int, str], None]) -> Iterator[tuple]:
    """``(origin, text, None)`` or ``(origin, None, chunks)`` for each non-blank line of ``path``, where
    ``chunks()`` yields the text field's decoded text block by block; ``note_replaced(count, origin)``
    hears of undecodable bytes (replaced by U+FFFD)."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            start = f.tell()
            head = f.readline(WHOLE_LINE_BYTES + 1)
            if not head:
                return
            lineno += 1
            origin = f"{path}:{lineno}"
            if len(head) <= WHOLE_LINE_BYTES or head.endswith(b"\n"):
                if head.strip():
                    line, bad = decode_utf8(head)
                    note_replaced(bad, origin)
                    yield origin, _text_field(_loads(line, origin), text_field, origin), None
                continue
            skeleton, spans = _scan_long_line(f, head, start, origin)
            skeleton = _restore_keys(path, skeleton, spans)
            _check_skeleton(skeleton, origin)
            line, bad = decode_utf8(skeleton)
            note_replaced(bad, origin)
            if not line.strip():
                continue
            text = _text_field(_loads(line, origin), text_field, origin)
            span = spans.get(text)
            for other in spans.values():  # checked and counted as json.loads would on the whole line
                if other is not span:
                    for _ in _string_chunks(path, other, origin, note_replaced):
                        pass
            if span is None:
                yield origin, text, None
            else:
                yield origin, None, lambda span=span, origin=origin: _string_chunks(path, span, origin, note_replaced)


def _loads(line: str, origin: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{origin}: not valid JSON ({err.msg})") from None


def _text_field(record, text_field: str, origin: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{origin}: no field {text_field!r} (found {keys}); choose one with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{origin}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _scan_long_line(f: BinaryIO, head: bytes, start: int, origin: str) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Read the rest of the line from ``f`` (``head`` is its first part, at file offset ``start``);
    return its skeleton and, for each marker in it, the file offsets ``(begin, end)`` of the long
    string's content that it stands for."""
    skeleton = bytearray()
    spans: dict[str, tuple[int, int]] = {}
    in_string = escaped = False  # escaped: the next byte of the string is escaped by a backslash
    content, long = bytearray(), False  # the current string's content while it is short
    begin = 0  # file offset of the current string's content
    block, offset = head, start
    while block:
        pos = 0
        while pos < len(block):
            if not in_string:
                quote = block.find(b'"', pos)
                stop = len(block) if quote < 0 else quote + 1
                skeleton += block[pos:stop]
                if quote >= 0:
                    in_string, escaped, long, begin = True, False, False, offset + stop
                    content.clear()
                pos = stop
                continue
            quote, escaped = _string_end(block, pos, escaped)
            stop = len(block) if quote < 0 else quote
            if not long and len(content) + stop - pos > LONG_STRING_BYTES:
                content.clear()
                long = True
            if not long:
                content += block[pos:stop]
            if quote >= 0:
                if long:
                    marker = f"{_MARKER}{len(spans)}"
                    spans[marker] = (begin, offset + quote)
                    skeleton += json.dumps(marker)[1:-1].encode()
                else:
                    skeleton += content
                skeleton += b'"'
                in_string = False
            pos = stop + (quote >= 0)
        _check_skeleton(skeleton, origin)
        if block.endswith(b"\n"):
            break
        offset += len(block)
        block = f.readline(BLOCK_BYTES)
    return bytes(skeleton), spans


def _check_skeleton(skeleton: bytes, origin: str) -> None:
    if len(skeleton) > SKELETON_BYTES:
        raise DataError(f"{origin}: more than {SKELETON_BYTES >> 20} MB of this line is outside its string values "
                        f"of over {LONG_STRING_BYTES >> 10} KB; such a line cannot be read in bounded memory")


def _restore_keys(path: Path, skeleton: bytes, spans: dict[str, tuple[int, int]]) -> bytes:
    """Put back into ``skeleton`` the long strings that are keys of an object (a marker followed by
    ``":``), read again from the file; they leave ``spans``."""
    marker = re.escape(json.dumps(_MARKER)[1:-1].encode())

    def restore(match: re.Match) -> bytes:
        begin, end = spans.pop(_MARKER + match[1].decode())
        with open(path, "rb") as f:
            f.seek(begin)
            return f.read(end - begin)

    return re.sub(marker + rb"(\d+)(?=\"[ \t\r\n]*:)", restore, skeleton)


def _string_end(block: bytes, pos: int, escaped: bool) -> tuple[int, bool]:
    """The index in ``block`` of the quote that ends the string whose content goes on at ``pos`` (-1:
    not in this block), and whether the byte after the block is escaped (when -1). Escaped
    backslashes, then escaped quotes, are blanked out (pairs left to right, as JSON reads them) in
    growing windows of the block, and the first quote left is the end."""
    if escaped:  # block[pos] is the escaped character of a backslash at the end of the last block
        if pos >= len(block):
            return -1, True
        pos += 1
    window = 1 << 12
    while True:
        quote = block[pos : pos + window].replace(b"\\\\", b"__").replace(b'\\"', b"__").find(b'"')
        if quote >= 0:
            return pos + quote, False
        if pos + window >= len(block):
            return -1, _backslashes_before(block, len(block), pos) % 2 == 1
        window *= 4


def _backslashes_before(data, end: int, lo: int) -> int:
    i = end
    while i > lo and data[i - 1] == 0x5C:
        i -= 1
    return end - i


def _string_chunks(path: Path, span: tuple[int, int], origin: str,
                   note_replaced: Callable[[int, str], None]) -> Iterator[str]:
    """The decoded text of the JSON string whose content is at file offsets ``span``, block by block."""
    begin, end = span

    def raw_blocks():
        with open(path, "rb") as f:
            f.seek(begin)
            left = end - begin
            while left > 0:
                block = f.read(min(BLOCK_BYTES, left))
                if not block:
                    raise DataError(f"{origin}: the file changed while it was read")
                left -= len(block)
                yield block

    pending = ""
    for source in decode_blocks(raw_blocks(), lambda bad: note_replaced(bad, origin)):
        data = pending + source
        cut = escape_safe_cut(data, len(data) - 12)
        pending = data[cut:]
        yield _loads_string(data[:cut], origin)
    yield _loads_string(pending, origin)


def escape_safe_cut(data: str, cut: int) -> int:
    """The largest position ``<= cut`` of the JSON string source ``data`` (which starts outside any
    escape) that no escape sequence straddles; a surrogate pair of ``\\u`` escapes is one sequence.
    An escape belongs to a run of backslashes: the run's pairs are escaped backslashes, and an odd
    run's last backslash starts an escape. The caller leaves 12 characters after ``cut``."""
    while cut > 0:
        b = data.rfind("\\", max(0, cut - 12), cut)
        if b < 0:
            return cut
        run = _run(data, b)
        if b == cut - 1:
            if run % 2 == 0:  # data[b] closes an escaped backslash
                return cut
            cut -= 1
            continue
        if run % 2 == 0:
            return cut
        length = 12 if _SURROGATE_PAIR.match(data, b) else 6 if data.startswith("u", b + 1) else 2
        if cut >= b + length:
            return cut
        cut = b
    return 0


def _run(data: str, b: int) -> int:
    """Length of the run of backslashes that ends at index ``b``."""
    i = b
    while i > 0 and data[i - 1] == "\\":
        i -= 1
    return b - i + 1


def _loads_string(source: str, origin: str) -> str:
    try:
        return json.loads(f'"{source}"')
    except json.JSONDecodeError as err:
        raise DataError(f"{origin}: not valid JSON ({err.msg})") from None
