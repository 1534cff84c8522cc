"""Shared fixtures: a small prepared corpus and tiny training configurations.

pytest puts ``tests/`` on ``sys.path`` (the test folders are packages under a folder that is not),
so the test packages import each other as ``data`` and ``train``, with plain ``pytest`` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.corpus import write_txt_corpus
from tpa.data.prepare import PrepareConfig, prepare
from tpa.data.sources import SourceSpec
from tpa.train.config import build_config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    write_txt_corpus(root / "src", 30, seed=0)
    out = root / "data"
    prepare(PrepareConfig(source=SourceSpec(source=[str(root / "src")]), out=str(out), vocab_size=320,
                          val_fraction=0.1, progress=False))
    return out


def tiny_config(data_dir: Path, run_dir: Path, **overrides):
    values = dict(preset="tiny", data_dir=str(data_dir), run_dir=str(run_dir), seq_len=32, global_batch_size=8,
                  micro_batch_size=4, max_steps=20, warmup_steps=4, lr=3e-3, min_lr=3e-4, eval_every=10,
                  eval_sequences=16, log_every=1, checkpoint_every=10, tensorboard=False, progress=False)
    values.update(overrides)
    return build_config(None, values)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("loss") is not None}
