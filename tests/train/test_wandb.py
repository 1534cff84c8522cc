"""``tpa train --wandb-project``: what Weights & Biases records (offline, read back from the run's .wandb
file), one W&B run continued across --resume, a failed run marked failed, and a clear error without wandb."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from _helpers import ForkedPython, subprocess_env
from train.conftest import read_metrics

PROJECT = "tpa-test"
STEPS = 4
# global batch 8 in micro-batches of 4: two training losses per step; from step 3 on they are NaN
POISONED_TRAIN = """
import sys, torch
import tpa.train.trainer as t
from tpa.cli import main
real, calls = t.lm_loss, [0]
def poisoned(logits, targets):
    loss = real(logits, targets)
    if torch.is_grad_enabled():
        calls[0] += 1
        if calls[0] > 2 * 2:
            return loss * float("nan")
    return loss
t.lm_loss = poisoned
sys.exit(main(sys.argv[1:]))
"""


def _train_args(data_dir: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(run), "--seq-len", "32",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--max-steps", str(STEPS), "--warmup-steps", "2",
            "--lr", "3e-3", "--min-lr", "3e-4", "--eval-every", "2", "--eval-sequences", "8", "--log-every", "1",
            "--checkpoint-every", "2", "--no-tensorboard", "--progress", "false", "--device", "cpu",
            "--wandb-project", PROJECT, *extra]


def _wandb_env(tmp: Path) -> dict:
    """Offline W&B whose every file (settings, cache, logs, artifacts) stays under ``tmp``."""
    env = {k: v for k, v in subprocess_env(OMP_NUM_THREADS="1", HOME=str(tmp / "home")).items()
           if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false", WANDB_DISABLE_GIT="true",
               **{f"WANDB_{k}_DIR": str(tmp / "wandb" / k.lower()) for k in ("CACHE", "CONFIG", "DATA", "ARTIFACT")},
               WANDB_DIR=str(tmp / "wandb" / "dir"))
    return env


def read_wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` transaction log (what ``wandb sync`` uploads), as protobuf ``Record``s.

    The file is a 7-byte header (":W&B", magic 0xBEE1, version 0) and then a LevelDB log: 32 KiB blocks of
    chunks, each a 7-byte header (CRC-32 of type and data, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a version-0 W&B log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer too small for a chunk header
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    assert pos == len(data), f"{path}: {len(data) - pos} trailing bytes"
    return records


def _items(items) -> dict:
    """History / config items as {key: value}; keys are in ``key`` or (newer wandb) ``nested_key``."""
    return {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _offline_run(run_dir: Path) -> dict:
    records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.HasField("run")]
    (exit_,) = [r.exit for r in records if r.HasField("exit")]
    history = {}
    for r in records:
        if r.HasField("history"):
            items = _items(r.history.item)
            history[items["_step"]] = items
    return dict(kinds=kinds, run=run, config=_items(run.config.update), history=history, exit_code=exit_.exit_code)


def test_wandb_offline_records_metrics_config_and_one_run_across_resume(data_dir, tmp_path):
    """A run that fails at step 3 (NaN loss, after the checkpoint of step 2) and its --resume to step 4: two
    offline segments of one W&B run (same id), the first marked failed, together holding every metrics.jsonl
    record at its step, and the run's configuration."""
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = _wandb_env(tmp_path)
    first = ForkedPython(POISONED_TRAIN, tmp_path / "first", _train_args(data_dir, run), env=env)
    assert first.wait(timeout=300) == 1 and "loss is nan at step 3" in first.stderr(), \
        first.stdout() + first.stderr()[-5000:]
    second = ForkedPython.cli(_train_args(data_dir, run, "--resume"), tmp_path / "second", env=env)
    assert second.wait(timeout=300) == 0, second.stdout() + second.stderr()[-5000:]

    dirs = sorted((run / "wandb").glob("offline-run-*"))  # offline-run-DATE_TIME-ID: oldest first
    assert len(dirs) == 2, dirs
    segments = [_offline_run(d) for d in dirs]
    run_id = segments[0]["run"].run_id
    assert segments[1]["run"].run_id == run_id, "the resumed training must continue the same W&B run"
    assert all(d.name.endswith("-" + run_id) for d in dirs)
    assert (run / "wandb_run_id.txt").read_text().strip() == run_id
    for seg in segments:
        assert seg["run"].project == PROJECT and seg["run"].display_name == "run"
        assert seg["kinds"][0] == "header" and seg["kinds"][-1] == "exit"
    assert [seg["exit_code"] for seg in segments] == [1, 0]  # the NaN run is marked failed

    # the configuration: every TrainConfig field, as the run saved it to config.yaml
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: v for k, v in segments[1]["config"].items() if k != "_wandb"} == saved
    assert segments[0]["config"]["resume"] is False and segments[1]["config"]["resume"] is True
    assert segments[0]["config"]["wandb_project"] == PROJECT and segments[0]["config"]["lr"] == 3e-3

    # the metrics: steps 0-2 in the failed segment, 3-4 after the resume, each equal to metrics.jsonl
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    assert sorted(segments[0]["history"]) == [0, 1, 2] and sorted(segments[1]["history"]) == [3, 4]
    history = {**segments[0]["history"], **segments[1]["history"]}
    for record in records:
        logged = history[record["step"]]
        want = {k: v for k, v in record.items() if v is not None}
        assert {k: logged[k] for k in want} == pytest.approx(want, rel=1e-12), record["step"]
        assert {k for k in logged if not k.startswith("_")} == set(want), record["step"]
    for step in range(1, STEPS + 1):
        assert history[step]["loss"] > 0 and history[step]["lr"] > 0 and history[step]["tokens_per_s"] > 0
    assert [s for s in sorted(history) if "val_loss" in history[s]] == [0, 2, 4]
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*wandb*"))


def test_wandb_project_without_wandb_is_a_clear_error(data_dir, tmp_path, monkeypatch, capsys):
    """With wandb not importable, --wandb-project stops `tpa train` before any work with an error naming the
    package and the flag (exit status 2, no traceback, no run directory)."""
    from tpa.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run = tmp_path / "run"
    assert main(_train_args(data_dir, run)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "--wandb-project" in err and "pip install wandb" in err and PROJECT in err
    assert not run.exists()
