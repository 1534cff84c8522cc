"""Issue 14 for `tpa data prepare`: --overwrite deletes only a prepared folder, memory stays bounded
for a huge one-line document, leftovers of a killed run are cleaned (and only those)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import subprocess_env
from data.corpus import write_txt_corpus
from tpa.data.prepare import PrepareConfig, prepare, read_meta
from tpa.data.sources import DataError, SourceSpec




def _prepare(source, out, **kw):
    return prepare(PrepareConfig(source=SourceSpec(source=[str(s) for s in source]), out=str(out), progress=False,
                                 **{"vocab_size": 280, **kw}))


# ---- 1. --overwrite replaces a prepared folder and nothing else


def test_overwrite_never_deletes_the_inputs(tmp_path):
    corpus = tmp_path / "ow" / "corpus"
    write_txt_corpus(corpus, 4)
    before = sorted(p.name for p in corpus.iterdir())
    for out in (corpus, corpus.parent):  # the corpus folder itself, and a folder above it
        with pytest.raises(DataError, match="holds the input"):
            _prepare([corpus], out, overwrite=True)
    assert sorted(p.name for p in corpus.iterdir()) == before


def test_overwrite_refuses_a_folder_that_is_not_prepared_data(tmp_path):
    write_txt_corpus(tmp_path / "src", 4)
    run = tmp_path / "run"  # e.g. a training run directory
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "config.yaml").write_text("lr: 1\n")
    with pytest.raises(DataError, match=r"not a prepared data folder \(it holds checkpoints, config.yaml\); refusing"):
        _prepare([tmp_path / "src"], run, overwrite=True)
    assert (run / "checkpoints" / "step_00000010").is_dir() and (run / "config.yaml").is_file()
    # a prepared folder with something of the user's in it is not replaced either
    _prepare([tmp_path / "src"], tmp_path / "data")
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="it holds notes.txt"):
        _prepare([tmp_path / "src"], tmp_path / "data", overwrite=True, vocab_size=290)
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_prepared_folder_even_as_the_working_directory(tmp_path, monkeypatch):
    write_txt_corpus(tmp_path / "src", 4)
    out = tmp_path / "data"
    _prepare([tmp_path / "src"], out)
    with pytest.raises(DataError, match="pass --overwrite"):
        _prepare([tmp_path / "src"], out, vocab_size=290)
    monkeypatch.chdir(out)
    _prepare([tmp_path / "src"], ".", overwrite=True, vocab_size=290)
    assert read_meta(out)["vocab_size"] == 290
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # no ..old-* or .data.tmp-* left


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    from tpa.cli import main

    write_txt_corpus(tmp_path / "src", 4)
    (tmp_path / "file").write_text("x")
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "file"), "--overwrite"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


# ---- 7. bounded memory for a huge one-line document


WORDS = ("the king speaks to the queen and all is well alas my lord the storm " * 16).encode()


def _write_words(f, megabytes: int) -> None:
    for _ in range(megabytes * 2**20 // len(WORDS)):
        f.write(WORDS)


def _memory_run(tmp_path: Path, kind: str, megabytes: int, limit_gb: float, other_mb: int = 0) -> subprocess.CompletedProcess:
    """`prepare` (with a ready tokenizer) in a child whose address space is limited to ``limit_gb`` GB
    above what it has before preparing, of one single-line document of ``megabytes`` MB: a .txt file,
    or the text field of a .jsonl line that also holds a string of ``other_mb`` MB in another field."""
    src = tmp_path / "huge"
    src.mkdir()
    if kind == "txt":
        with open(src / "one_line.txt", "wb") as f:
            _write_words(f, megabytes)
    else:
        with open(src / "one_line.jsonl", "wb") as f:
            f.write(b'{"id": 7, "html": "<p>')
            html = b'\\u00e9\\n<b>\\"quoted\\"</b> ' * 1024  # escapes and quotes that the reader must skip
            for _ in range(other_mb * 2**20 // len(html)):
                f.write(html)
            f.write(b'", "text": "')
            _write_words(f, megabytes)
            f.write(b'", "n": [1, 2.5, null]}\n{"text": "a short one"}\n')
    write_txt_corpus(tmp_path / "small", 8)
    _prepare([tmp_path / "small"], tmp_path / "tok_data", vocab_size=600)  # whole words: fewer tokens, faster
    script = f"""
import resource, sys
from tpa.data.prepare import PrepareConfig, prepare
from tpa.data.sources import SourceSpec
import tokenizers, transformers, numpy, tqdm.auto  # loaded before the limit is set
import torch, transformers.models.auto.tokenization_auto  # (transformers' lazy imports map torch's libraries)
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
limit = vm + int({limit_gb} * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
meta = prepare(PrepareConfig(source=SourceSpec(source=[{str(src)!r}]), out={str(tmp_path / 'out')!r},
                             tokenizer={str(tmp_path / 'tok_data' / 'tokenizer')!r}, val_fraction=0, progress=False))
print("RESULT", meta["tokens"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    env = subprocess_env(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)


def _check_memory_run(tmp_path: Path, kind: str, megabytes: int, limit_gb: float, other_mb: int = 0) -> None:
    proc = _memory_run(tmp_path, kind, megabytes, limit_gb, other_mb)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens, peak_mb = map(int, proc.stdout.split("RESULT")[1].split())
    assert tokens > megabytes * 2**20 // 8  # the whole document was tokenized
    print(f"{megabytes} MB {kind} document ({other_mb} MB besides): {tokens:,} tokens, peak RSS {peak_mb} MB")


linux_only = pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux /proc for the limit")


@linux_only
def test_a_single_line_document_fits_a_fixed_memory_limit(tmp_path):
    """Tokenized whole (~250x its size), a 2 MB line needs ~0.5 GB; in pieces it fits in 0.25 GB (the
    50 MB variant below, marked slow, fits in the same limit)."""
    _check_memory_run(tmp_path, "txt", 2, 0.25)


@linux_only
def test_a_jsonl_line_larger_than_the_memory_limit_is_read_in_blocks(tmp_path):
    """A 301 MB .jsonl line (a 1 MB text field and a 300 MB string besides) under a 0.25 GB limit: read
    whole, the line alone would not fit."""
    _check_memory_run(tmp_path, "jsonl", 1, 0.25, other_mb=300)


@linux_only
@pytest.mark.slow
def test_a_50_mb_single_line_document_fits_the_same_limit(tmp_path):
    _check_memory_run(tmp_path, "txt", 50, 0.25)


@linux_only
@pytest.mark.slow
def test_a_50_mb_jsonl_text_field_fits_the_same_limit(tmp_path):
    """Tokenized whole, 50 MB of text would need about 250 times that (issue 14 measured 4.9 GB for 20 MB)."""
    _check_memory_run(tmp_path, "jsonl", 50, 0.25, other_mb=1)


# ---- 10. leftovers of a killed prepare are removed by the next run, a live one's are not


def test_a_killed_prepare_leaves_nothing_after_the_next_run(tmp_path):
    import fcntl

    write_txt_corpus(tmp_path / "src", 6)
    out = tmp_path / "data"
    script = f"""
import os, signal
import tpa.data.prepare as p
real = p.encode_batch
def die(tok, texts):
    os.kill(os.getpid(), signal.SIGKILL)
p.encode_batch = die
p.prepare(p.PrepareConfig(source=p.SourceSpec(source=[{str(tmp_path / 'src')!r}]), out={str(out)!r},
                          vocab_size=280, progress=False))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    [left] = tmp_path.glob(".data.tmp-*")
    live = tmp_path / ".data.tmp-live"  # another prepare, still running
    live.mkdir()
    fd = os.open(live / ".owner.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    unknown = tmp_path / ".data.tmp-unknown"  # no owner lock: not provably stale
    unknown.mkdir()
    try:
        _prepare([tmp_path / "src"], out)
    finally:
        os.close(fd)
    assert not left.exists() and live.is_dir() and unknown.is_dir()
    assert read_meta(out)["documents"] == 6
