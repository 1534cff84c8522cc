"""Metrics: JSONL and CSV files, TensorBoard, optional Weights & Biases; FLOPs, MFU, memory; run info."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import resource
import secrets
import sys
from pathlib import Path

import torch

from tpa.utils.runinfo import run_info  # noqa: F401  (re-exported for the trainer)

CSV_FIELDS = ["step", "tokens", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb",
              "elapsed_s"]

# Dense bf16 peak TFLOP/s from the vendors' datasheets (no sparsity), matched on the device name.
PEAK_BF16_TFLOPS = [("H200", 989.5), ("H100 PCIe", 756.0), ("H100", 989.5), ("A100", 312.0), ("L40S", 362.05),
                    ("A10G", 70.0), ("L4", 121.0), ("4090", 165.2), ("3090", 71.0)]


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def flops_per_token(model: torch.nn.Module, config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters used in matrix products) + 12 x L x H x D x T.

    The first term counts forward and backward of every weight matrix (the tied output head included,
    the embedding lookup excluded); the second is the attention scores and the weighted sum of values
    (PaLM's accounting, without discounting the causal mask).
    """
    params = sum(p.numel() for p in model.parameters())
    if not getattr(config, "tie_word_embeddings", True):
        params -= model.get_input_embeddings().weight.numel()
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * params + attn


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPUs, peak resident set size of the process on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 2**20 if sys.platform != "darwin" else rss_kb / 2**30


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` in RUN_DIR/metrics.jsonl and metrics.csv (atomically);
    a line cut short by a kill is dropped too."""
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        kept = []
        for line in jsonl.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if line.endswith("\n") and record.get("step", step + 1) <= step:
                kept.append(line)
        _rewrite(jsonl, kept)
    table = run_dir / "metrics.csv"
    if table.is_file():
        lines = table.read_text().splitlines(keepends=True)
        kept = lines[:1]
        for line, row in zip(lines[1:], csv.DictReader(lines)):
            if line.endswith("\n") and row.get("step", "").isdigit() and int(row["step"]) <= step:
                kept.append(line)
        _rewrite(table, kept)


class MissingPackage(RuntimeError):
    """A logging backend was asked for, but its package is not installed."""


def check_logging_packages(*, tensorboard: bool, wandb_project: str | None) -> None:
    """Fail before any work when an asked-for logging backend is missing.

    Every rank calls this, so under torchrun all ranks stop at once with the same message instead of
    rank 0 failing alone after the model is built.
    """
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise MissingPackage("tensorboard=True needs the tensorboard package: pip install tensorboard "
                             "(or pass --no-tensorboard)")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise MissingPackage(f"wandb_project={wandb_project!r} (--wandb-project) needs the wandb package, which is "
                             "not installed: pip install wandb (or leave --wandb-project out)")


WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of this run directory: kept in RUN_DIR/wandb_run_id.txt and reused on resume.

    A run resumed from a checkpoint continues the same W&B run; a fresh start gets a new id.
    ``WANDB_RUN_ID`` in the environment, when set, wins.
    """
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    path = run_dir / WANDB_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def log_line(record: dict, max_steps: int) -> str:
    """One line of a log record, for output that is not a terminal (a file, a pipe, a CI log):
    ``step 20/400 | loss 4.1234 | val 4.2000 | lr 3.00e-04 | grad 0.512 | 12,345 tok/s | mfu 1.2% | 0.50 GB | 35s``
    (fields that are None are left out)."""
    r = record
    parts = [f"step {r['step']}/{max_steps}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                     ("grad_norm", "grad {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"),
                     ("memory_gb", "{:.2f} GB"), ("elapsed_s", "{:.0f}s")):
        if r.get(key) is not None:
            parts.append(fmt.format(r[key]))
    return " | ".join(parts)


class MetricsLogger:
    """Appends records to metrics.jsonl and metrics.csv, and to TensorBoard / W&B when enabled.

    Only rank 0 makes one. Files are appended to, so a resumed run continues the same files, and
    (with ``resume``) the same W&B run. ``resume_step``: the step the run starts from (-1: from
    scratch); records of later steps (written by a run stopped after that step, and about to be
    written again) are dropped from both files first, and TensorBoard purges them.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool, wandb_project: str | None, config: dict,
                 resume: bool = False, resume_step: int | None = None):
        check_logging_packages(tensorboard=tensorboard, wandb_project=wandb_project)
        self.tb = None
        self.wandb = None
        if resume_step is not None:
            truncate_metrics(run_dir, resume_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        csv_path = run_dir / "metrics.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self.csv_file = open(csv_path, "a", newline="")
        try:
            self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                self.csv.writeheader()
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            if wandb_project:
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=run_dir.name, config=config, dir=str(run_dir),
                                        id=wandb_run_id(run_dir, resume), resume="allow")
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.csv.writerow(record)
        self.csv_file.flush()
        step = record["step"]
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=step)

    def close(self, failed: bool = False) -> None:
        """Close the files; a W&B run is marked failed (exit code 1) when training raised."""
        self.jsonl.close()
        self.csv_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
