"""``prepare``: documents -> tokenizer -> token shards split into train and validation by document.

Output folder (written atomically: built in a hidden temporary sibling, then renamed)::

    OUT/
      meta.json              tokenizer, vocabulary size, dtype, token and document counts, arguments
      tokenizer/             the tokenizer (PreTrainedTokenizerFast), loadable with AutoTokenizer
      train_000000.bin ...   raw little-endian uint16/uint32 token ids, no header
      val_000000.bin ...
      val_documents.npy      source-order indices of the documents that went to validation

Every document is stored as ``[separator] + tokens(document)``, the separator being the tokenizer's
bos token (or its eos token when it has no bos), as nanoGPT does with GPT-2's ``<|endoftext|>``.

The split is exact and deterministic: of the N non-empty documents, ``round(val_fraction * N)``
(at least one when ``val_fraction > 0``) are drawn for validation by a permutation seeded with
``seed``; both splits keep the source order. The tokenizer, when trained here, sees every document
(validation included), as is usual for corpus-level BPE.

Re-running with the same arguments (and, for local files, the same file sizes and modification
times) finds the finished folder and does nothing; different arguments need ``overwrite=True``,
which replaces only a folder that is recognisably a prepared one (a readable meta.json and nothing
but the files listed above) and never one that holds the inputs.

Memory does not grow with a document's size: documents are tokenized in pieces of about
``PIECE_CHARS`` characters cut at the tokenizer's own pre-token boundaries, so the tokens are those of
the whole document (:func:`tpa.data.tokenizer.piece_cutter` checks this on a probe text; a tokenizer
that fails it, e.g. one without a pre-tokenizer, gets each document whole, with a note). A .txt file
and a .jsonl line longer than 8 MB are read in blocks (:mod:`tpa.data.jsonl`), a parquet file by
batches of rows and a large cell decoded from Arrow's buffer; Arrow holds a cell whole while it is
read (it cannot read part of one). A stretch of over ``MAX_UNCUT_CHARS`` characters without a
pre-token boundary is refused rather than tokenized inexactly.
The temporary and trash folders of a killed run are deleted by the next one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpa.data.errors import DataError
from tpa.data.sources import SourceSpec, SourceStats, fetch_shakespeare, iter_documents, list_local_files
from tpa.data.text import PIECE_CHARS, PieceCutter
from tpa.data.tokenizer import bpe_pre_tokenizer, encode_batch, load_tokenizer, piece_cutter, separator_id, train_bpe

FORMAT = "tpa-token-shards"
FORMAT_VERSION = 1
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_COPY_TOKENS = 1 << 22  # tokens copied from the stream to a shard at once

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no stale-folder detection
    fcntl = None


@dataclass
class PrepareConfig:
    source: SourceSpec
    out: str
    tokenizer: str | None = None  # HF name or path; None trains a byte-level BPE of vocab_size
    vocab_size: int = 8192
    tokenizer_train_documents: int | None = None  # train the BPE on the first N documents only (None: all)
    val_fraction: float = 0.05
    seed: int = 0
    dtype: str = "auto"  # auto, uint16, uint32
    shard_tokens: int = 100_000_000
    batch_documents: int = 64
    overwrite: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal


def choose_dtype(vocab_size: int, requested: str) -> str:
    if requested == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in DTYPES:
        raise DataError(f"unknown dtype {requested!r}; use auto, uint16 or uint32")
    limit = np.iinfo(DTYPES[requested]).max + 1
    if vocab_size > limit:
        raise DataError(f"the tokenizer has {vocab_size} tokens, more than {requested} holds ({limit}); use --dtype uint32 or auto")
    return requested


def _fingerprint(cfg: PrepareConfig) -> str:
    items = {
        "format": [FORMAT, FORMAT_VERSION],
        "source": cfg.source.describe(),
        "tokenizer": cfg.tokenizer,
        "vocab_size": None if cfg.tokenizer else cfg.vocab_size,
        "tokenizer_train_documents": None if cfg.tokenizer else cfg.tokenizer_train_documents,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "shard_tokens": cfg.shard_tokens,
    }
    src = cfg.source.source
    if not (len(src) == 1 and (src[0] == "shakespeare" or src[0].startswith("hf:"))):
        items["files"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in list_local_files(src)]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(data_dir: str | os.PathLike) -> dict:
    """The meta.json of a prepared folder, checked: format, version, and both splits with their shards."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data folder (no meta.json); run `tpa data prepare` first")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); prepare the folder again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise DataError(f"{path}: format {got[0]} v{got[1]}, expected {FORMAT} v{FORMAT_VERSION}")
    splits = meta.get("splits")
    for split in ("train", "val"):
        entry = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("tokens"), int) \
                or not isinstance(entry.get("shards"), list):
            raise DataError(f"{path}: no {split!r} split (splits.{split} with tokens and shards); "
                            "prepare the folder again")
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise DataError(f"{path}: no {key!r} field; prepare the folder again")
    return meta


def check_tokenizer_dir(data_dir: str | os.PathLike, meta: dict) -> Path:
    """The prepared folder's tokenizer directory, or a DataError saying it is missing."""
    folder = Path(data_dir) / meta["tokenizer"]
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise DataError(f"{folder} is missing (or holds no tokenizer.json / tokenizer_config.json): the prepared "
                        f"folder {data_dir} has no tokenizer, which training needs for the exported model; "
                        "prepare the folder again")
    return folder


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def _open(self):
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self._count == self.shard_tokens:
                self._close()
                self._open()
            take = min(len(tokens), self.shard_tokens - self._count)
            tokens[:take].astype(self.dtype, copy=False).tofile(self._file)
            self._count += take
            self.shards[-1]["tokens"] = self._count
            tokens = tokens[take:]

    def _close(self):
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


# What a prepared folder holds; anything else in a folder means it is not (only) ours.
_OURS = re.compile(r"^(meta\.json|tokenizer|val_documents\.npy|(train|val)_\d{6}\.bin)$")
_OWNER_LOCK = ".owner.lock"  # held (flock) by the prepare that made a temporary or trash folder


def _check_out(cfg: PrepareConfig, out: Path, fingerprint: str) -> dict | None:
    """Refuse an --out that is a file, that holds the inputs, or that is not recognisably a prepared
    folder (even with --overwrite); return the existing metadata when it is already prepared so."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    src = cfg.source.source
    if not (len(src) == 1 and (src[0] == "shakespeare" or src[0].startswith("hf:"))):
        target = out.resolve()
        for given in src:
            p = Path(given).resolve()
            if p == target or target in p.parents:
                raise DataError(f"--out {out} holds the input {given}: preparing there would replace the corpus; "
                                "choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return None
    strangers = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
    try:
        old = read_meta(out)
    except DataError:
        old = None
    if old is not None and old.get("fingerprint") == fingerprint:
        return old
    if old is None or strangers:
        what = f"it holds {', '.join(strangers[:5])}" if strangers else "it has no readable meta.json"
        raise DataError(f"{out} exists and is not a prepared data folder ({what}); refusing to replace it, "
                        "with or without --overwrite: choose another --out")
    if not cfg.overwrite:
        raise DataError(f"{out} holds data prepared with other arguments; pass --overwrite to replace it")
    return None


def _owned_folder(parent: Path, prefix: str) -> tuple[Path, int]:
    """A new hidden folder with an owner lock held by this process (see :func:`_remove_stale`)."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    fd = os.open(folder / _OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return folder, fd


def _remove_stale(out: Path) -> None:
    """Delete the temporary (``.OUT.tmp-*``) and trash (``.OUT.old-*``) folders of killed prepares: those
    whose owner lock no process holds. A folder without an owner lock is left alone (not provably stale)."""
    if fcntl is None:
        return
    for folder in out.parent.glob(f".{out.name}.*-*"):
        lock = folder / _OWNER_LOCK
        if not (folder.name.startswith(f".{out.name}.tmp-") or folder.name.startswith(f".{out.name}.old-")) \
                or not lock.is_file():
            continue
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live prepare
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"removed {folder}, left by a `tpa data prepare` that was killed")


def prepare(cfg: PrepareConfig) -> dict:
    """Prepare token shards as described in the module docstring; return the metadata."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.tokenizer_train_documents is not None and cfg.tokenizer_train_documents < 1:
        raise DataError(f"tokenizer_train_documents must be >= 1, got {cfg.tokenizer_train_documents}")
    if cfg.shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {cfg.shard_tokens}")
    if cfg.dtype not in ("auto", *DTYPES):
        raise DataError(f"unknown dtype {cfg.dtype!r}; use auto, uint16 or uint32")
    if cfg.source.source == ["shakespeare"]:
        fetch_shakespeare(cfg.source.cache_dir, folio=cfg.source.folio)  # before the fingerprint: fail early

    shown = Path(cfg.out)
    out = shown.resolve()  # `--out .` has a name
    fingerprint = _fingerprint(cfg)
    old = _check_out(cfg, shown, fingerprint)
    if old is not None:
        print(f"{shown} is already prepared with these arguments ({old['splits']['train']['tokens']:,} train tokens); "
              "nothing to do")
        return old
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp, lock_fd = _owned_folder(out.parent, f".{out.name}.tmp-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder gets the usual mode
    try:
        meta, stats = _build(cfg, tmp, fingerprint)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock_fd)
    if stats.replaced_bytes:
        print(f"warning: {stats.replaced_bytes} undecodable byte(s) replaced by U+FFFD, first in: {', '.join(stats.replaced_in)}")
    if stats.empty_documents:
        print(f"note: {stats.empty_documents} empty document(s) skipped")
    splits = meta["splits"]
    print(f"prepared {shown}: {meta['documents']:,} documents, {splits['train']['tokens']:,} train / "
          f"{splits['val']['tokens']:,} val tokens, vocabulary {meta['vocab_size']:,} ({meta['dtype']})")
    return meta


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (a prepared folder) is moved into a trash folder first."""
    (tmp / _OWNER_LOCK).unlink()
    if not out.exists():
        os.rename(tmp, out)
        return
    trash, fd = _owned_folder(out.parent, f".{out.name}.old-")
    try:
        os.rename(out, trash / out.name)
        os.rename(tmp, out)
        shutil.rmtree(trash / out.name, ignore_errors=True)  # the owner lock goes last
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        os.close(fd)


def _tokenizer(cfg: PrepareConfig, show):
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), cfg.tokenizer
    train_stats = SourceStats()
    docs = itertools.islice(iter_documents(cfg.source, train_stats), cfg.tokenizer_train_documents)
    print(f"training a byte-level BPE tokenizer with {cfg.vocab_size} tokens ...")
    cutter = PieceCutter(bpe_pre_tokenizer())
    tok = train_bpe((piece for doc in docs for piece in doc.pieces(cutter)), cfg.vocab_size,
                    show_progress=bool(show))
    if train_stats.documents == 0:
        raise DataError(f"no documents in {cfg.source.source}: the input is empty")
    return tok, f"byte-level BPE trained here, vocab_size={cfg.vocab_size}"


def _encode_all(cfg: PrepareConfig, tok, sep: int, dtype, path: Path, stats: SourceStats, show) -> list[int]:
    """Write ``[sep] + tokens(document)`` of every document to ``path``; return each document's length.

    Documents are tokenized in pieces (:meth:`Document.pieces`), batches of at most
    ``batch_documents`` pieces and ``PIECE_CHARS`` characters, so memory does not grow with a
    document's size."""
    from tqdm.auto import tqdm

    cutter = piece_cutter(tok)
    if cutter is None:
        print(f"note: {cfg.tokenizer} gives other tokens for pieces of a text than for the whole text (it has no "
              "pre-tokenizer, or one that depends on where a text starts): each document is tokenized whole, "
              "so memory grows with the longest document")
    lengths: list[int] = []
    bar = tqdm(desc="tokenizing", unit="doc", disable=None if show is None else not show)
    batch: list[tuple[bool, str]] = []  # (first piece of a document, text)
    chars = 0
    with open(path, "wb") as f:
        def flush():
            for (first, _), ids in zip(batch, encode_batch(tok, [text for _, text in batch])):
                if first:
                    np.asarray([sep], dtype=dtype).tofile(f)
                    lengths.append(1)
                    bar.update(1)
                np.asarray(ids, dtype=dtype).tofile(f)
                lengths[-1] += len(ids)
            batch.clear()
            bar.set_postfix(tokens=f"{sum(lengths):,}")

        for doc in iter_documents(cfg.source, stats):
            for k, piece in enumerate(doc.pieces(cutter)):
                batch.append((k == 0, piece))
                chars += len(piece)
                if len(batch) >= cfg.batch_documents or chars >= PIECE_CHARS:
                    flush()
                    chars = 0
        if batch:
            flush()
    bar.close()
    return lengths


def _build(cfg: PrepareConfig, tmp: Path, fingerprint: str) -> tuple[dict, SourceStats]:
    """Tokenizer, token stream, split and shards into ``tmp``; return the metadata and source counts."""
    show = cfg.progress
    # 1. Tokenizer
    tok, tokenizer_source = _tokenizer(cfg, show)
    tok.save_pretrained(tmp / "tokenizer")
    vocab_size = len(tok)
    dtype_name = choose_dtype(vocab_size, cfg.dtype)
    dtype = DTYPES[dtype_name]
    sep = separator_id(tok)

    # 2. Encode every document into one temporary stream, remembering document lengths.
    stats = SourceStats()
    all_path = tmp / "all.tmp"
    lengths = _encode_all(cfg, tok, sep, dtype, all_path, stats, show)
    total = sum(lengths)
    n_docs = len(lengths)
    if n_docs == 0:
        raise DataError(f"no documents in {cfg.source.source}: the input is empty"
                        + (f" ({stats.empty_documents} empty documents skipped)" if stats.empty_documents else ""))

    # 3. Split by document.
    n_val = int(round(cfg.val_fraction * n_docs))
    if cfg.val_fraction > 0:
        n_val = max(1, n_val)
        if n_val >= n_docs:
            raise DataError(f"{n_docs} document(s) cannot be split into train and validation with "
                            f"val_fraction={cfg.val_fraction}; give more documents or --val-fraction 0")
    perm = np.random.default_rng(cfg.seed).permutation(n_docs)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[perm[:n_val]] = True
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    stream = np.memmap(all_path, dtype=dtype, mode="r") if total else np.zeros(0, dtype=dtype)

    splits = {}
    for split, want in (("train", False), ("val", True)):
        writer = _ShardWriter(tmp, split, dtype, cfg.shard_tokens)
        docs = np.flatnonzero(is_val == want)
        for i in docs:
            for lo in range(int(offsets[i]), int(offsets[i + 1]), _COPY_TOKENS):  # bounded pieces of a document
                writer.write(np.asarray(stream[lo : min(lo + _COPY_TOKENS, int(offsets[i + 1]))]))
        shards = writer.close()
        splits[split] = {"documents": int(len(docs)), "tokens": int(sum(s["tokens"] for s in shards)), "shards": shards}
    del stream
    np.save(tmp / "val_documents.npy", np.flatnonzero(is_val))
    all_path.unlink()

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": "tokenizer",
        "tokenizer_source": tokenizer_source,
        "vocab_size": vocab_size,
        "dtype": dtype_name,
        "separator_token_id": int(sep),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "documents": n_docs,
        "empty_documents": stats.empty_documents,
        "replaced_bytes": stats.replaced_bytes,
        "replaced_in": stats.replaced_in,
        "tokens": int(total),
        "splits": splits,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "shard_tokens": cfg.shard_tokens,
        "source": cfg.source.describe(),
    }
    _write_json(tmp / "meta.json", meta)
    return meta, stats
