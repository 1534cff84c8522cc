"""Issue 14 point 7: data preparation streams. Pieces of a text give the tokens of the whole text;
long jsonl lines and parquet cells read in blocks give what reading them whole gives."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from data.corpus import documents, write_txt_corpus
from tpa.data import jsonl, sources
from tpa.data.prepare import PrepareConfig, prepare
from tpa.data.sources import DataError, SourceSpec, SourceStats
from tpa.data.text import PieceCutter
from tpa.data.tokenizer import encode_batch, piece_cutter, train_bpe

WORDS = ["the", "king's", "don't", "Ω", "naïve", "日本語", "😀", "12", "3.5", "x=y;", "--", "'", '"', "\\", "A.B",
         "e\u0301", "Ġ", "\u0000", "I'M", "wörld", "ñ" * 40, "a" * 150, "7" * 30]
SEPS = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "", ", ", "\r\n", " " * 90]


def random_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPS) for _ in range(words))


def _tokenizers(rng: random.Random) -> dict:
    """Tokenizers of the kinds in use, trained here on random text: GPT-2's byte-level BPE (the one
    `tpa data prepare` trains), Llama 3's (a regex split, then bytes), and SentencePiece-style Metaspace."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [random_text(rng, 200) for _ in range(20)]
    toks = {"gpt2": train_bpe(corpus, 400)}
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    for name, pre in (("llama3", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])),
                      ("metaspace", pre_tokenizers.Metaspace())):
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre
        core.decoder = decoders.ByteLevel() if name == "llama3" else decoders.Metaspace()
        alphabet = pre_tokenizers.ByteLevel.alphabet() if name == "llama3" else []
        core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                                             initial_alphabet=alphabet, show_progress=False))
        toks[name] = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>")
    return toks


def test_pieces_give_the_tokens_of_the_whole_text():
    rng = random.Random(0)
    for name, tok in _tokenizers(rng).items():
        cutter = piece_cutter(tok, max_chars=100)
        assert cutter is not None, name
        for trial in range(6):
            text = random_text(rng, 400)
            whole = encode_batch(tok, [text])[0]
            pieces = list(cutter.pieces(text))
            cuts = sorted(rng.sample(range(1, len(text)), 25))
            chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            streamed = list(cutter.pieces_of_chunks(chunks))
            for got in (pieces, streamed):
                assert "".join(got) == text and all(got)
                assert len(got) > len(text) // 400, name  # it does cut
                assert [t for ids in encode_batch(tok, got) for t in ids] == whole, (name, trial)


def test_a_tokenizer_whose_pieces_differ_tokenizes_whole(tmp_path, capsys):
    """A SentencePiece conversion that prepends "▁" in its normalizer and has no pre-tokenizer (as
    Llama 2's) would tokenize a piece unlike the middle of a text: documents go whole to it."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    docs = documents(4, seed=1)
    core.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>")
    assert piece_cutter(tok) is None
    tok.save_pretrained(tmp_path / "tok")
    write_txt_corpus(tmp_path / "src", 4, seed=1)
    meta = prepare(PrepareConfig(source=SourceSpec(source=[str(tmp_path / "src")]), out=str(tmp_path / "out"),
                                 tokenizer=str(tmp_path / "tok"), val_fraction=0, progress=False))
    assert "each document is tokenized whole" in capsys.readouterr().out
    stream = np.fromfile(tmp_path / "out" / "train_000000.bin", dtype=np.uint16).tolist()
    expect = [t for ids in encode_batch(tok, docs) for t in [tok.bos_token_id, *ids]]
    assert stream == expect and meta["tokens"] == len(expect)


def test_a_word_too_long_to_cut_is_refused(monkeypatch):
    from tpa.data import text

    monkeypatch.setattr(text, "MAX_UNCUT_CHARS", 5000)
    cutter = PieceCutter(train_bpe(["a b"], 260).backend_tokenizer.pre_tokenizer, max_chars=100)
    assert "".join(cutter.pieces_of_chunks(["word " * 10, "x" * 3000, " tail"])) == "word " * 10 + "x" * 3000 + " tail"
    doc = sources.Document("big.txt:1", chunks=lambda: iter(["word " * 10] + ["x" * 1000] * 6))
    with pytest.raises(DataError, match=r"big\.txt:1: more than 5,000 characters without a pre-token boundary"):
        list(doc.pieces(cutter))
    with pytest.raises(DataError, match=r"big\.txt:1: more than 5,000 characters"):
        list(sources.Document("big.txt:1", text="word " * 10 + "x" * 6000).pieces(cutter))


# ---- jsonl: a long line read in blocks gives what json.loads of the whole line gives


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1.5e300, 12345678901234567890])
    if kind in (1, 2, 3):
        return random_text(rng, rng.choice([0, 1, 3, 40]))
    if kind in (4, 5):
        return {random_text(rng, 1): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _records(path: Path) -> tuple[list, SourceStats]:
    stats = SourceStats()
    out = [(origin, text if text is not None else "".join(chunks()))
           for origin, text, chunks in jsonl.iter_records(path, "text", stats.note_replaced)]
    return out, stats


def _small_blocks(monkeypatch, long_string: int = 8, block: int = 7):
    monkeypatch.setattr(jsonl, "WHOLE_LINE_BYTES", 0)  # every line read in blocks
    monkeypatch.setattr(jsonl, "LONG_STRING_BYTES", long_string)
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", block)


@pytest.mark.parametrize("long_string,block", [(8, 7), (0, 1), (64, 13), (3, 4096)])
def test_long_lines_read_in_blocks_equal_json_loads(tmp_path, monkeypatch, long_string, block):
    rng = random.Random(long_string * 1000 + block)
    lines = []
    for i in range(60):
        record = {"id": random_text(rng, 1)}
        record.update({random_text(rng, 1): _random_value(rng) for _ in range(rng.randrange(3))})
        record["text"] = random_text(rng, rng.choice([0, 1, 5, 80]))
        record.update({random_text(rng, 1): _random_value(rng) for _ in range(rng.randrange(3))})
        line = json.dumps(record, ensure_ascii=rng.random() < 0.5).encode()
        if i % 7 == 3:  # bytes that are not UTF-8, inside and outside the text
            line = line.replace(b'"text": "', b'"text": "\xff\xc3', 1).replace(b'{"id": "', b'{"id": "\x80', 1) \
                if b'"text": "' in line else line
        lines.append(line + (b"\r\n" if i % 5 == 0 else b"\n") + (b"   \n" if i % 9 == 0 else b""))
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines)[:-1])  # the last line without its newline
    whole, whole_stats = _records(tmp_path / "a.jsonl")
    _small_blocks(monkeypatch, long_string, block)
    streamed, streamed_stats = _records(tmp_path / "a.jsonl")
    assert streamed == whole and len(whole) == 60
    assert streamed_stats.replaced_bytes == whole_stats.replaced_bytes > 0


@pytest.mark.parametrize("line,message", [
    ('{"text": "abc\\q and more"}', r"not valid JSON \(Invalid \\escape"),
    ('{"text": "abc\tdef and more"}', r"not valid JSON \(Invalid control character"),
    ('{"text": "abcdefghijk", "other": "\\ud83d \\x"}', r"not valid JSON \(Invalid \\escape"),
    ('{"text": "abcdefghijklmnop", }', r"not valid JSON \(Expecting property name"),
    ('{"text": "abcdefghijklmnop"} {"x": 1}', r"not valid JSON \(Extra data"),
    ('{"text": "abcdefghijklmnop', r"not valid JSON \((Unterminated string|Invalid control)"),
    ('["abcdefghijklmnop"]', r"no field 'text' \(found list\)"),
    ('{"body": "abcdefghijklmnop"}', r"no field 'text' \(found \['body'\]\)"),
    ('{"text": ["abcdefghijklmnop"]}', r"field 'text' is list, not a string"),
])
def test_bad_long_lines_fail_as_whole_lines_do(tmp_path, monkeypatch, line, message):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: " + message):
        _records(tmp_path / "a.jsonl")
    _small_blocks(monkeypatch)
    with pytest.raises(DataError, match=r"a\.jsonl:2: " + message):
        _records(tmp_path / "a.jsonl")


def test_a_long_line_that_is_mostly_structure_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x" * 50, "n": list(range(100))}) + "\n"
                                      + json.dumps({"k" * 300: 1, "text": "x" * 50}) + "\n")
    _small_blocks(monkeypatch, long_string=16, block=64)
    monkeypatch.setattr(jsonl, "SKELETON_BYTES", 200)
    with pytest.raises(DataError, match=r"a\.jsonl:1: more than 0 MB of this line is outside its string values"):
        _records(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_text(json.dumps({"k" * 300: 1, "text": "x" * 50}) + "\n")  # a long key
    with pytest.raises(DataError, match=r"a\.jsonl:1: more than"):
        _records(tmp_path / "a.jsonl")


def test_escape_safe_cuts_keep_every_escape_whole():
    rng = random.Random(3)
    for _ in range(200):
        text = random_text(rng, 30) + "".join(rng.choice(["😀", "\\", '"', "\n", "é", "\ud800x"]) for _ in range(20))
        source = json.dumps(text, ensure_ascii=rng.random() < 0.5)[1:-1]
        decoded, start = [], 0
        while start < len(source):
            want = start + rng.randrange(1, 30)
            cut = jsonl.escape_safe_cut(source[start:], want - start) + start if want + 12 <= len(source) else len(source)
            if cut == start:
                cut = len(source)
            decoded.append(json.loads(f'"{source[start:cut]}"'))
            start = cut
        assert "".join(decoded) == text


def test_long_parquet_cells_are_read_in_blocks(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    texts = [random_text(rng, rng.choice([0, 3, 300])) for _ in range(40)] + [None]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"text": pa.array(texts, pa.large_string())}), tmp_path / "b.parquet")
    read = lambda name: [(d.origin, d.text if d.text is not None else "".join(d.chunks()))
                         for d in sources._iter_parquet(tmp_path / name, "text", SourceStats())]
    whole = read("a.parquet")
    assert [t for _, t in whole] == [t or "" for t in texts] and read("b.parquet") == [
        (o.replace("a.parquet", "b.parquet"), t) for o, t in whole]
    monkeypatch.setattr(sources, "PARQUET_WHOLE_CELL_BYTES", 10)
    monkeypatch.setattr(sources, "PIECE_CHARS", 5)  # blocks of 5 bytes: UTF-8 characters cut
    assert read("a.parquet") == whole
    assert sum(d.text is None for d in sources._iter_parquet(tmp_path / "a.parquet", "text", SourceStats())) > 10
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="column 'text' holds int64, not strings"):
        read("c.parquet")


# ---- the whole `prepare`: streaming and reading whole give the same folder


def test_prepare_streamed_equals_prepare_whole(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import tpa.data.prepare as prep

    rng = random.Random(9)
    src = tmp_path / "src"
    write_txt_corpus(src / "txt", 3, seed=4)
    (src / "txt" / "long.txt").write_text(random_text(rng, 3000), encoding="utf-8")
    with open(src / "a.jsonl", "w", encoding="utf-8") as f:
        for i in range(12):
            record = {"id": i, "meta": {"html": random_text(rng, 50)}, "text": random_text(rng, rng.choice([1, 30, 900]))}
            f.write(json.dumps(record, ensure_ascii=i % 2 == 0) + "\n")
    pq.write_table(pa.table({"text": [random_text(rng, rng.choice([2, 700])) for _ in range(9)]}), src / "b.parquet",
                   row_group_size=4)

    def run(out: str) -> dict:
        meta = prepare(PrepareConfig(source=SourceSpec(source=[str(src)]), out=str(tmp_path / out), vocab_size=500,
                                     val_fraction=0.2, progress=False))
        return {p.name: p.read_bytes() for p in sorted((tmp_path / out).rglob("*")) if p.is_file()
                and p.name != "meta.json"} | {"meta": {k: v for k, v in meta.items() if k != "created"}}

    whole = run("whole")
    real_cutter, real_class = prep.piece_cutter, prep.PieceCutter
    monkeypatch.setattr(prep, "piece_cutter", lambda tok: real_cutter(tok, max_chars=64))
    monkeypatch.setattr(prep, "PieceCutter", lambda pre: real_class(pre, max_chars=64))
    _small_blocks(monkeypatch, long_string=16, block=100)
    monkeypatch.setattr(sources, "PARQUET_WHOLE_CELL_BYTES", 100)
    monkeypatch.setattr(sources, "PIECE_CHARS", 50)
    streamed = run("streamed")
    assert streamed["meta"]["tokens"] == whole["meta"]["tokens"] > 10_000
    assert streamed == whole
