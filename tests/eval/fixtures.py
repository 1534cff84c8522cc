"""Shared test data for tests/eval and tests/bench: a small corpus, its token shards, a tiny trained
model directory, and local lm-eval tasks. Everything is made here; nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

NAMES = ["the king", "a fool", "the queen", "my lord", "the knight", "a ghost", "the nurse", "our friend"]
VERBS = ["speaks to", "laughs at", "follows", "betrays", "loves", "fears", "greets", "forgives"]
THINGS = ["the crown", "his brother", "the storm", "her father", "the sword", "a letter", "the moon", "the sea"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}."
    return s[0].upper() + s[1:]


def write_corpus(folder: Path, documents: int = 24, sentences: int = 30, seed: int = 0) -> list[str]:
    """``documents`` .txt files of ``sentences`` templated sentences each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(documents):
        text = "\n".join(sentence(rng) for _ in range(sentences)) + "\n"
        (folder / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    return docs


def prepare_shards(src: Path, out: Path, vocab_size: int = 320) -> Path:
    from tpa.data.prepare import PrepareConfig, prepare
    from tpa.data.sources import SourceSpec

    prepare(PrepareConfig(source=SourceSpec(source=[str(src)]), out=str(out), vocab_size=vocab_size,
                          val_fraction=0.15, progress=False))
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """``(text folder, token-shard folder, documents)``."""
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root / "src")
    return root / "src", prepare_shards(root / "src", root / "data"), docs


@pytest.fixture(scope="session")
def trained_model(corpus, tmp_path_factory) -> Path:
    """A tiny T6 (TPA) trained on the corpus by `tpa train`'s loop and exported with its tokenizer."""
    from tpa.train.config import build_config
    from tpa.train.trainer import train

    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = build_config(None, dict(preset="tiny", data_dir=str(corpus[1]), run_dir=str(run), seq_len=48,
                                  global_batch_size=8, micro_batch_size=8, max_steps=60, warmup_steps=5, lr=3e-3,
                                  min_lr=3e-4, eval_every=60, eval_sequences=4, log_every=10, checkpoint_every=60,
                                  tensorboard=False, progress=False, model_overrides={"num_hidden_layers": 2}))
    result = train(cfg)
    assert result.export_dir is not None
    return Path(result.export_dir)


def write_tasks(folder: Path, docs: list[str]) -> dict[str, str]:
    """Local lm-eval tasks (YAML + jsonl) in ``folder``; returns task name -> kind.

    - ``tpa_test_mc``: multiple choice (which verb follows a subject), with a train split for few-shot;
    - ``tpa_test_ll``: loglikelihood of a continuation (greedy match and perplexity);
    - ``tpa_test_rolling`` / ``tpa_test_rolling_shuffled``: loglikelihood_rolling over corpus sentences,
      in order and with their words shuffled.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    mc = []
    for _ in range(24):
        subject = rng.choice(NAMES).capitalize()
        right = rng.choice(THINGS)
        wrong = [w for w in ("banana", "seven", "quickly") if w != right]
        choices = [f" {rng.choice(VERBS)} {right}."] + [f" {w} {w}." for w in wrong[:2]]
        order = list(range(3))
        rng.shuffle(order)
        mc.append({"question": subject, "choices": [choices[j] for j in order], "answer": order.index(0)})
    mc_train, mc_test = jsonl("mc_train.jsonl", mc[:8]), jsonl("mc_test.jsonl", mc[8:])
    (folder / "tpa_test_mc.yaml").write_text(f"""task: tpa_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {mc_train}
    test: {mc_test}
training_split: train
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    ll = []
    for _ in range(10):
        s = sentence(rng)
        head, tail = s.rsplit(" ", 2)[0], " " + " ".join(s.rsplit(" ", 2)[1:])
        ll.append({"context": head, "continuation": tail})
    ll_path = jsonl("ll.jsonl", ll)
    (folder / "tpa_test_ll.yaml").write_text(f"""task: tpa_test_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ll_path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    lines = [line for d in docs[:4] for line in d.splitlines()][:40]
    shuffled = []
    for line in lines:
        words = line.rstrip(".").lower().split()
        rng.shuffle(words)
        shuffled.append(" ".join(words).capitalize() + ".")
    texts = {"tpa_test_rolling": lines, "tpa_test_rolling_shuffled": shuffled}
    for task, rows in texts.items():
        # a few sentences per document, so documents are longer than one model window
        path = jsonl(f"{task}.jsonl", [{"text": "\n".join(rows[i : i + 8])} for i in range(0, len(rows), 8)])
        (folder / f"{task}.yaml").write_text(f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return {"tpa_test_mc": "multiple_choice", "tpa_test_ll": "loglikelihood", "tpa_test_rolling": "rolling",
            "tpa_test_rolling_shuffled": "rolling"}
