"""`tpa eval ppl`: windowing, agreement with the model's own loss, memorised text vs random tokens, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.eval.fixtures import prepare_shards, write_corpus
from tpa.cli import main
from tpa.eval.ppl import evaluate_tokens, windows


def test_windows_predict_every_token_once():
    for n, t in [(2, 5), (10, 3), (11, 5), (100, 7), (8, 7), (9, 7)]:
        spans = windows(n, t)
        targets = [i for s, length in spans for i in range(s + 1, s + length)]
        assert targets == list(range(1, n)), (n, t)
        assert all(2 <= length <= t + 1 for _, length in spans)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpa  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_ppl_on_shards_equals_the_models_own_loss(trained_model, corpus, tmp_path, capsys):
    from tpa.data.loader import TokenShards

    out = tmp_path / "out"
    rc = main(["eval", "ppl", "--model", str(trained_model), "--data", str(corpus[1]), "--seq-len", "20",
               "--batch-size", "3", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'ppl.json'}" in printed and f"wrote {out / 'ppl.md'}" in printed
    record = json.loads((out / "ppl.json").read_text())
    assert "| model | data | tokens | loss | perplexity | tokens/s |" in (out / "ppl.md").read_text()
    tokens = TokenShards(corpus[1], "val").read(0, TokenShards(corpus[1], "val").num_tokens)
    assert record["tokens"] == len(tokens) - 1 and record["split"] == "val"
    # the same windows through the model's labels= loss (mean over each window's predictions)
    model, _ = _load(trained_model)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 20):
            ids = torch.from_numpy(tokens[start : start + 21])[None]
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    expected = total / (len(tokens) - 1)
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
    assert record["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_text_files_are_tokenized_as_documents(trained_model, corpus, tmp_path):
    _, tokenizer = _load(trained_model)
    files = sorted(corpus[0].glob("*.txt"))[:2]
    out = tmp_path / "out"
    assert main(["eval", "ppl", "--model", str(trained_model), "--data", *map(str, files), "--device", "cpu",
                 "--output", str(out)]) == 0
    record = json.loads((out / "ppl.json").read_text())
    # each document is its separator token + its tokens; every token but the first is predicted
    expected = sum(len(tokenizer(f.read_text(), add_special_tokens=False)["input_ids"]) + 1 for f in files) - 1
    assert record["tokens"] == expected and record["data_kind"] == "text"


def test_memorised_text_has_lower_perplexity_than_random_tokens(trained_model, corpus, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "ppl", "--model", str(trained_model), "--data", str(corpus[0]), "--device", "cpu",
                 "--max-tokens", "2000", "--output", str(out)]) == 0
    seen = json.loads((out / "ppl.json").read_text())["perplexity"]
    model, tokenizer = _load(trained_model)
    rng = np.random.default_rng(0)
    random_tokens = rng.integers(0, len(tokenizer), 2000)
    noise = evaluate_tokens(model, random_tokens, seq_len=48, progress=False)["perplexity"]
    assert seen < 5 < 50 < noise, (seen, noise)


def test_bad_arguments_fail_clearly(trained_model, corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "ppl", "--model", str(empty), "--data", str(corpus[1])]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(trained_model), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(trained_model), "--data", str(corpus[1]), "--seq-len", "4096",
                 "--device", "cpu"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["eval", "ppl", "--model", str(trained_model), "--data", str(corpus[1]), "--split", "test",
                 "--device", "cpu"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    # token shards made with another tokenizer: their ids mean other words to this model
    write_corpus(tmp_path / "src2", documents=6, seed=3)
    other = prepare_shards(tmp_path / "src2", tmp_path / "data2", vocab_size=300)
    assert main(["eval", "ppl", "--model", str(trained_model), "--data", str(other), "--device", "cpu"]) == 2
    assert "another tokenizer" in capsys.readouterr().err
