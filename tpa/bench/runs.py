"""Training runs for the benchmarks, through the project's training loop (:func:`tpa.train.trainer.train`).

``tpa bench train`` and ``tpa ablate`` do not have a loop of their own: they fill a
:class:`~tpa.train.config.TrainConfig`, call ``train`` and read the metrics it logs
(``RUN_DIR/metrics.jsonl``: step, tokens, loss, val_loss, tokens_per_s, mfu, memory_gb, ...).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

from tpa.utils.args import UsageError


class RunInterrupted(RuntimeError):
    """The training loop stopped early (SIGINT/SIGTERM); the benchmark writes what it has and stops."""


def check_data_dir(path: str) -> dict:
    """The metadata of a ``tpa data prepare`` folder, or a :class:`UsageError` that says how to make one."""
    from tpa.data.prepare import read_meta
    from tpa.data.sources import DataError

    try:
        return read_meta(path)
    except DataError as err:
        raise UsageError(f"--data: {err}") from None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_run(values: dict, run_dir: Path, *, fresh: bool = True, keep_checkpoints: bool = False) -> dict:
    """Train with the configuration ``values`` (TrainConfig fields) into ``run_dir``.

    Args:
        values: TrainConfig fields; ``run_dir``, ``tensorboard`` and ``progress`` are set here unless given.
        fresh: delete ``run_dir`` first (it belongs to the benchmark).
        keep_checkpoints: otherwise the checkpoint folder is deleted after the run (the metrics stay).

    Raises:
        UsageError: bad configuration values or data. RunInterrupted: stopped by a signal.

    Returns:
        ``{"config", "model_config", "records", "result"}``: the resolved TrainConfig as a dict, the
        model's T6Config as a dict, the metric records and the TrainResult fields.
    """
    from tpa.data.sources import DataError
    from tpa.train.config import build_config
    from tpa.train.trainer import NonFiniteLoss, train

    run_dir = Path(run_dir)
    if values.get("compile"):
        # compiled graphs of earlier runs in this process would count towards dynamo's recompile limit
        # (8 per code object) and, once it is hit, leave this run's blocks uncompiled
        import torch

        torch._dynamo.reset()
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    values = {"tensorboard": False, "progress": False, **values, "run_dir": str(run_dir)}
    try:
        cfg = build_config(None, values)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        result = train(cfg, argv=["tpa.bench"])
    except DataError as err:
        raise UsageError(f"--data: {err}") from None
    except NonFiniteLoss as err:
        raise RuntimeError(f"{cfg.attention_type}: {err}") from None
    if result.stopped != "finished":
        raise RunInterrupted(f"the {cfg.attention_type} run stopped at step {result.step} ({result.stopped})")
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    model_config = json.loads((run_dir / "model_config.json").read_text())
    return {"config": cfg.to_dict(), "model_config": model_config, "records": read_metrics(run_dir),
            "result": {"step": result.step, "tokens": result.tokens, "val_loss": result.val_loss,
                       "stopped": result.stopped, "export_dir": str(result.export_dir) if result.export_dir else None}}


def throughput(records: list[dict], skip_steps: int = 0) -> dict:
    """Training speed from metric records (one per logged window).

    ``tokens_per_s`` is the total tokens of the windows after step ``skip_steps`` over their total
    training time (each window's time is its tokens over its logged tokens/s, so evaluation and
    checkpoint time are not counted); ``median_tokens_per_s`` and ``mfu`` are medians over those
    windows; ``peak_memory_gb`` is the largest logged value.
    """
    windows = []
    prev_tokens = None
    for r in records:
        if r.get("loss") is None:  # the step-0 evaluation record
            prev_tokens = r.get("tokens", 0)
            continue
        tokens = r["tokens"] - (prev_tokens or 0)
        prev_tokens = r["tokens"]
        if r["step"] <= skip_steps or not r.get("tokens_per_s"):
            continue
        windows.append((tokens, tokens / r["tokens_per_s"], r["tokens_per_s"], r.get("mfu")))
    memory = [r["memory_gb"] for r in records if r.get("memory_gb") is not None]
    if not windows:
        return {"tokens_per_s": None, "median_tokens_per_s": None, "mfu": None,
                "peak_memory_gb": max(memory) if memory else None, "timed_steps_tokens": 0}
    total_tokens = sum(w[0] for w in windows)
    total_time = sum(w[1] for w in windows)
    mfus = [w[3] for w in windows if w[3] is not None]
    return {"tokens_per_s": total_tokens / total_time, "median_tokens_per_s": statistics.median(w[2] for w in windows),
            "mfu": statistics.median(mfus) if mfus else None, "peak_memory_gb": max(memory) if memory else None,
            "timed_steps_tokens": total_tokens}


def final_val_loss(records: list[dict]) -> float | None:
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return vals[-1] if vals else None


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")
