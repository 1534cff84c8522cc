"""The training loop: one process on a CPU or GPU, or torchrun ranks with DDP or FSDP2.

:func:`train` sets up the process group and runs a :class:`Trainer`, which has torchtitan's shape:
its constructor is the setup (data, the model from its preset, :func:`~tpa.train.parallel.parallelize`,
AdamW with weight decay on matrices only, the cosine schedule, the restored checkpoint when
resuming); :meth:`Trainer.fit` is the loop, one screen long, built from :meth:`Trainer.train_step`
(this rank's slice of the global batch, gradients accumulated over micro-batches, the loss reduced,
a non-finite one stops the run, clip, step), :meth:`Trainer.evaluate`, :meth:`Trainer.log` and
:meth:`Trainer.save`. At the end it exports a HuggingFace model directory.
``--init-from`` starts from a model directory instead of a fresh model, and ``--distill-from`` adds
a teacher's KL term to the loss (:mod:`tpa.train.distill`)."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tpa.data.loader import TokenShards, TrainBatches, val_batch, val_sequences
from tpa.data.prepare import check_tokenizer_dir, read_meta
from tpa.train import checkpoint as ckpt
from tpa.train.config import TrainConfig, save_yaml
from tpa.train.distill import DISTILL_FIELDS, load_init_model, make_distiller
from tpa.train.metrics import (MetricsLogger, check_logging_packages, flops_per_token, log_line, memory_gb,
                               peak_tflops, run_info)
from tpa.train.parallel import (DataParallelOptions, Dist, parallelize, resolve_parallel, setup_distributed,
                                teardown_distributed)
from tpa.train.runlock import RunDirLocked, RunLock

# T6Config fields that may differ between a checkpoint and the run that resumes it: how the same
# model is computed (kernels, cache, MLA's absorbed form), the library version, and the
# initialisation scale (a resumed model is not initialised). Every other field must agree.
RUNTIME_MODEL_FIELDS = frozenset({"attn_impl", "decode_impl", "use_cache", "mla_absorb", "tpa_cache_head_multiple",
                                  "transformers_version", "dtype", "torch_dtype", "initializer_range"})

# Exit status of `tpa train` when SIGINT/SIGTERM stopped it (after writing a checkpoint): 128 + signal
# number, as a shell reports a process killed by that signal (130 for SIGINT, 143 for SIGTERM).
SIGNAL_EXIT_BASE = 128


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite; no optimizer step or checkpoint was taken."""


class RunDirError(ValueError):
    """The run directory cannot be written, or a checkpoint in it does not fit this run."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    export_dir: Path | None
    stopped: str  # "finished", "halted" (halt_at_step), "signal" or "exported" (export_only)
    checkpoint: Path | None
    signal: int | None = None  # the signal number when stopped == "signal"


def cosine_lr_factor(step: int, *, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up then cosine to min."""
    if step < warmup:
        return (step + 1) / warmup
    if max_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; ``targets`` are already shifted."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (parameters of 2+ dims: linear weights, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_model_config(cfg: TrainConfig, meta: dict):
    from tpa import T6Config

    data_vocab = int(meta["vocab_size"])
    vocab = cfg.vocab_size if cfg.vocab_size is not None else 64 * math.ceil(data_vocab / 64)
    if vocab < data_vocab:
        raise ValueError(f"vocab_size={vocab} is smaller than the data's tokenizer ({data_vocab} tokens)")
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("max_position_embeddings", cfg.seq_len)
    return T6Config.from_preset(
        cfg.preset, cfg.attention_type, vocab_size=vocab, bos_token_id=meta.get("bos_token_id"),
        eos_token_id=meta.get("eos_token_id"), pad_token_id=meta.get("eos_token_id"), **overrides)


def model_config_dict(mconfig) -> dict:
    """The model config as plain JSON values (what a checkpoint's trainer.json stores)."""
    import json

    return json.loads(mconfig.to_json_string(use_diff=False))


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume ``path`` into another model: every field but :data:`RUNTIME_MODEL_FIELDS` must agree."""
    fields = sorted((saved.keys() | current.keys()) - RUNTIME_MODEL_FIELDS)
    diff = [f"{k} (checkpoint {saved.get(k)!r}, this run {current.get(k)!r})" for k in fields
            if saved.get(k) != current.get(k)]
    if diff:
        raise RunDirError(f"{path} was trained with another model: {'; '.join(diff)}. Resume with the checkpoint's "
                          "model settings (preset, attention type, model_overrides, vocab_size, data) or start a "
                          "new --run-dir")


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and leaves at the end of the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C leaves at once
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, argv: list[str] | None = None) -> TrainResult:
    """Run (or resume) a training run as configured; see the module docstring."""
    cfg.validate()
    created_pg = not (dist.is_available() and dist.is_initialized())
    world = setup_distributed(cfg.device, cfg.tp)
    try:
        return _train(cfg, world, argv if argv is not None else sys.argv)
    finally:
        if created_pg:
            teardown_distributed()


def _all_reduce_sum(values: list[float], world: Dist) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.enabled:
        dist.all_reduce(t)
    return t.tolist()


# With deferred host reads: the most steps between two reads of the loss (and of a stop signal).
_DEFERRED_READ_EVERY = 10


def _deferred_optimizer_step(model, optimizer, loss: torch.Tensor, grad_clip: float, world: Dist, pending: list,
                             step: int) -> None:
    """Clip and step without the host reading anything from the device: the rank-averaged loss and
    the gradient norm stay on the device, and the fused AdamW skips the update (on the device) when
    either is not finite. The values go to ``pending`` for :func:`_read_pending`."""
    loss = loss.detach().float()
    if world.enabled:
        dist.all_reduce(loss)
        loss = loss / world.world_size
    norm = None
    bad = ~torch.isfinite(loss)
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        bad = bad | ~torch.isfinite(norm)
    optimizer.found_inf = bad.float()
    optimizer.step()
    pending.append((step, loss, norm, bad))


def _read_pending(pending: list, last_ckpt) -> tuple[float, float | None]:
    """Read the deferred values (one host sync) and empty ``pending``; return the latest step's loss
    and gradient norm, or raise :class:`NonFiniteLoss` naming the first step whose loss or norm was
    not finite (its update was skipped on the device, as were those of later non-finite steps)."""
    rows = [(step, loss.item(), None if norm is None else norm.item()) for step, loss, norm, _ in pending]
    pending.clear()
    for step, loss, norm in rows:
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            what, value = ("training loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
            raise _non_finite(what, value, step, last_ckpt,
                              "the optimizer skipped that step's update and the run stopped at the next read of "
                              f"the loss (step {rows[-1][0]}; host_sync='deferred')")
    return rows[-1][1], rows[-1][2]


def _non_finite(what: str, value: float, step: int, last_ckpt, how: str) -> NonFiniteLoss:
    """The one message of a non-finite loss or gradient norm."""
    return NonFiniteLoss(
        f"the {what} is {value} at step {step}; {how}. "
        f"The last good checkpoint is {last_ckpt or 'none (nothing was saved yet)'}. "
        "Lower the learning rate (`--resume --lr ...` continues from that checkpoint with the new value: the "
        "command line's optimizer settings win on resume), or check the data.")


def _train(cfg: TrainConfig, world: Dist, argv: list[str]) -> TrainResult:
    # every rank, before any work: a missing TensorBoard / W&B package stops all ranks at once
    check_logging_packages(tensorboard=cfg.tensorboard and not cfg.export_only,
                           wandb_project=None if cfg.export_only else cfg.wandb_project)
    with _locked_run_dir(cfg.resolved_run_dir(), world):
        trainer = Trainer(cfg, world)
        if cfg.export_only:
            return trainer.export_checkpoint()
        trainer.open_run_dir(argv)
        return trainer.fit()


@contextlib.contextmanager
def _locked_run_dir(run_dir: Path, world: Dist):
    """Rank 0 holds the run directory's lock (:class:`RunLock`) for the whole run and deletes what
    killed runs left in it; when it cannot take the lock, every rank stops with its error."""
    lock, error = contextlib.ExitStack(), None
    if world.is_main:
        try:
            lock.enter_context(RunLock(run_dir))
        except (RunDirLocked, OSError) as err:
            error = err
    if _all_reduce_sum([float(error is not None)], world)[0] > 0:
        if isinstance(error, OSError):
            raise RunDirError(f"cannot write the run directory {run_dir}: {error.strerror or error}") from None
        raise error if error is not None else RunDirError(f"rank 0 could not lock {run_dir}")
    with lock:
        if world.is_main:
            for path in ckpt.remove_stale(run_dir / "checkpoints"):
                print(f"removed {path}, left by a run that was killed while saving or rotating checkpoints")
        yield


class Trainer:
    """One training run, in torchtitan's shape: the constructor sets everything up (data, model,
    parallelism, optimizer, schedule, the restored checkpoint); :meth:`fit` is the loop, built from
    :meth:`train_step`, :meth:`evaluate`, :meth:`log` and :meth:`save`."""

    def __init__(self, cfg: TrainConfig, world: Dist):
        self.cfg, self.world, self.device = cfg, world, world.device
        self.run_dir = cfg.resolved_run_dir()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume_from = ckpt.find_resumable(self.ckpt_dir) if cfg.resume else None
        if not cfg.resume and ckpt.list_checkpoints(self.ckpt_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints: pass --resume to continue it, "
                             "or choose another --run-dir")
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self.step, self.tokens, self.val_loss = 0, 0, None
        self.last_ckpt = self.resume_from
        self.logger = None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif cfg.resume and world.is_main:
            print(f"--resume: no checkpoint in {self.ckpt_dir}, starting from scratch")

    # ---- setup

    def _setup_data(self) -> None:
        cfg, world = self.cfg, self.world
        self.meta = read_meta(cfg.data_dir)
        self.tokenizer_dir = check_tokenizer_dir(cfg.data_dir, self.meta)  # now, not at the export after training
        self.train_shards = TokenShards(cfg.data_dir, "train")
        self.val_shards = TokenShards(cfg.data_dir, "val") if self.meta["splits"]["val"]["tokens"] else None
        self.batches = TrainBatches(self.train_shards, cfg.seq_len, cfg.data_seed)
        if cfg.global_batch_size % (cfg.micro_batch_size * world.dp_size):
            raise ValueError(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size="
                             f"{cfg.micro_batch_size} x data-parallel size {world.dp_size}")
        self.accum = cfg.global_batch_size // (cfg.micro_batch_size * world.dp_size)
        self.n_val = 0
        if self.val_shards is not None:
            self.n_val = (val_sequences(self.val_shards, cfg.seq_len, cfg.eval_sequences)
                          // world.dp_size * world.dp_size)

    def _setup_model(self) -> None:
        from tpa import T6ForCausalLM

        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)
        if cfg.init_from is not None:
            self.mconfig, model = load_init_model(cfg.init_from, int(self.meta["vocab_size"]), cfg.seq_len)
            self.model = model.to(device)
        else:
            self.mconfig = build_model_config(cfg, self.meta)
            self.model = T6ForCausalLM(self.mconfig).to(device)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                                and torch.cuda.is_bf16_supported())
        self.mode = resolve_parallel(cfg.parallel, self.world, sum(p.numel() for p in self.model.parameters()))
        options = DataParallelOptions(ddp_bucket_mb=cfg.ddp_bucket_mb, ddp_static_graph=cfg.ddp_static_graph,
                                      fsdp_prefetch=cfg.fsdp_prefetch, gradient_accumulation=self.accum)
        self.train_model = parallelize(self.model, parallel=self.mode, world=self.world, bf16=self.bf16,
                                       compile=cfg.compile, activation_checkpointing=cfg.activation_checkpointing,
                                       tp_shard_shared=cfg.tp_shard_shared, options=options)
        self.loss_fn = torch.compile(lm_loss) if cfg.compile else lm_loss
        self.distiller = make_distiller(cfg, self.mconfig.vocab_size, device, self.mode, self.world, self.bf16,
                                        self.autocast)
        self.flops_per_token = flops_per_token(self.model, self.mconfig, cfg.seq_len)
        self.peak_tflops = cfg.peak_tflops or peak_tflops(device)

    def autocast(self):
        if self.bf16 and self.mode != "fsdp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _setup_optimizer(self) -> None:
        cfg, device, mode = self.cfg, self.device, self.mode
        if cfg.host_sync == "deferred" and mode == "fsdp":
            raise ValueError("host_sync='deferred' needs the fused AdamW, which FSDP2 runs do not use")
        self.deferred = cfg.host_sync == "deferred" or (cfg.host_sync == "auto" and device.type == "cuda"
                                                        and mode != "fsdp" and self.world.tp_size == 1)
        # the fused AdamW skips a step on the device when told a value was not finite (found_inf)
        fused = (device.type == "cuda" and mode != "fsdp") or self.deferred
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=fused or None, foreach=None if fused else True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: cosine_lr_factor(
            s, warmup=cfg.warmup_steps, max_steps=cfg.max_steps, min_ratio=cfg.min_lr / cfg.lr))

    def _restore(self, path: Path) -> None:
        """Load ``path`` into the model, optimizer, schedule and data position. The model config must
        equal the checkpoint's (but for :data:`RUNTIME_MODEL_FIELDS`), and so must the init/distillation
        settings; the optimizer hyper-parameters of this run's configuration win over the checkpoint's
        (see :meth:`_apply_hyperparameters`)."""
        saved = ckpt.read_trainer_state(path)
        check_same_model(saved["model_config"], model_config_dict(self.mconfig), path)
        saved_cfg = saved["config"]
        defaults = TrainConfig()  # checkpoints from before these fields hold their defaults
        diff = {k: (saved_cfg.get(k, getattr(defaults, k)), getattr(self.cfg, k)) for k in DISTILL_FIELDS
                if saved_cfg.get(k, getattr(defaults, k)) != getattr(self.cfg, k)}
        if diff:
            raise RunDirError(f"{path} was trained with other init/distillation settings (checkpoint, this run): "
                              f"{diff}")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens, self.val_loss = state["step"], state["tokens"], state.get("val_loss")
        self._apply_hyperparameters(saved.get("config", {}))

    def _apply_hyperparameters(self, saved_cfg: dict) -> None:
        """The command line wins: set lr (through the schedule), betas, eps and weight decay of this
        run's configuration on the restored optimizer, and say which differ from the checkpoint's. (The
        schedule's warm-up, max_steps and min_lr always come from this run: they are not saved.)"""
        cfg = self.cfg
        changed = [f"{k} {saved_cfg[k]} -> {getattr(cfg, k)}" for k in ("lr", "min_lr", "beta1", "beta2", "eps",
                                                                         "weight_decay", "warmup_steps")
                   if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        for group, decay in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):
            group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         weight_decay=decay)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if changed and self.world.is_main:
            print(f"--resume: this run's optimizer settings replace the checkpoint's: {', '.join(changed)}")

    def export_checkpoint(self) -> TrainResult:
        """--export-only: write the restored checkpoint as a HuggingFace directory."""
        if self.resume_from is None:
            raise ValueError(f"--export-only: no checkpoint in {self.ckpt_dir} to export")
        out = export_hf(self.model, self.mconfig, self.tokenizer_dir,
                        self.run_dir / f"export_step_{self.step:08d}", self.world)
        if self.world.is_main:
            print(f"exported {self.resume_from} (step {self.step}) to {out}")
        return self._result("exported", out)

    def open_run_dir(self, argv: list[str]) -> None:
        """Rank 0 writes config.yaml, model_config.json and a run_info.jsonl line and opens the metrics."""
        if not self.world.is_main:
            return
        import json

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, self.run_dir / "config.yaml")
        self.mconfig.to_json_file(str(self.run_dir / "model_config.json"))
        with open(self.run_dir / "run_info.jsonl", "a") as f:
            info = run_info(self.device, self.world.world_size, argv)
            info.update(parallel=self.mode, bf16=self.bf16, gradient_accumulation=self.accum,
                        resumed_from=str(self.resume_from or ""),
                        parameters=sum(p.numel() for p in self.model.parameters()))
            f.write(json.dumps(info) + "\n")
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                    config=cfg.to_dict(), resume=self.resume_from is not None,
                                    resume_step=self.step if self.resume_from is not None else -1)

    # ---- the loop

    def fit(self) -> TrainResult:
        """Train to max_steps (or halt_at_step, or a signal), checkpointing and evaluating on the way."""
        from tqdm.auto import tqdm

        cfg, world = self.cfg, self.world
        if cfg.halt_at_step is not None and self.step >= cfg.halt_at_step and self.step < cfg.max_steps:
            if world.is_main:
                print(f"already at step {self.step} >= halt_at_step={cfg.halt_at_step}: nothing to train")
            if self.logger is not None:
                self.logger.close()
            return self._result("halted", None)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"{cfg.preset}-{cfg.attention_type}", unit="step",
                   disable=(not world.is_main) or (None if cfg.progress is None else not cfg.progress),
                   dynamic_ncols=True)
        # without a terminal (a file, a pipe) the bar draws nothing useful: one plain line per log step instead
        self.log_lines = world.is_main and (bar.disable or not sys.stdout.isatty())
        stopped, self.profiler, failed = "finished", None, True
        self.signum = None
        self.pending: list[tuple] = []  # deferred host reads: (step, loss, grad norm, not-finite flag) on the device
        self.train_loss = self.grad_norm = None
        self.window_time, self.window_tokens = 0.0, 0
        self.start_time = time.perf_counter()
        try:
            if self.step == 0:
                self.val_loss = self.evaluate()
                self.log({"step": 0, "tokens": 0, "val_loss": self.val_loss, "lr": self.scheduler.get_last_lr()[0]})
            self.train_model.train()
            with _StopFlag() as stop_flag:
                while self.step < cfg.max_steps:
                    self._profile_start()
                    t0 = time.perf_counter()
                    lr, signals = self.train_step(stop_flag)
                    self.window_time += time.perf_counter() - t0
                    self.window_tokens += cfg.global_batch_size * cfg.seq_len
                    evaluated = self._eval_due()
                    if evaluated:
                        self.val_loss = self.evaluate()
                    self._log_step(lr, evaluated, bar)
                    self._profile_stop()
                    bar.update(1)
                    if self.train_loss is not None:
                        bar.set_postfix(loss=f"{self.train_loss:.3f}", lr=f"{lr:.2e}")
                    stopped = self._stop_reason(signals, stop_flag)
                    if stopped != "finished" or self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                        self.last_ckpt = self.save()
                    if stopped != "finished":
                        break
            failed = False
        finally:
            if self.profiler is not None:
                _write_profile(self.profiler, self.run_dir, self.device)
            bar.close()
            if self.logger is not None:
                self.logger.close(failed=failed)
        return self._finish(stopped)

    def train_step(self, stop_flag: _StopFlag) -> tuple[float, float]:
        """One optimizer step over the global batch; return its lr and the ranks' stop signals (summed).

        Reading every step, a non-finite loss or gradient norm stops before the optimizer step; with
        deferred reads the values are read every few steps (see :func:`_deferred_optimizer_step`).
        """
        cfg = self.cfg
        rows = self.batches.next_batch(cfg.global_batch_size, self.world.dp_rank, self.world.dp_size)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        loss = self._forward_backward(rows.to(self.device, non_blocking=True))
        lr = self.scheduler.get_last_lr()[0]
        if self.deferred:
            _deferred_optimizer_step(self.model, self.optimizer, loss, cfg.grad_clip, self.world, self.pending,
                                     self.step + 1)
        else:
            signals = self._checked_optimizer_step(loss, stop_flag)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.global_batch_size * cfg.seq_len
        if self.deferred:
            signals = self._deferred_read(stop_flag)
        return lr, signals

    def _forward_backward(self, rows: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradients of ``rows`` (B, T+1) over micro-batches; return the mean loss (device)."""
        loss_sum = torch.zeros((), device=self.device)
        for k, micro in enumerate(rows.split(self.cfg.micro_batch_size)):
            last = k == self.accum - 1
            sync = contextlib.nullcontext()
            if self.mode == "ddp" and not last:
                sync = self.train_model.no_sync()
            elif self.mode == "fsdp":
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    logits = self.train_model(input_ids=micro[:, :-1], use_cache=False).logits
                loss = self.loss_fn(logits, micro[:, 1:])
                if self.distiller is not None:
                    loss = loss + self.distiller(logits, micro[:, :-1])
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        return loss_sum / self.accum

    def _checked_optimizer_step(self, loss: torch.Tensor, stop_flag: _StopFlag) -> float:
        """Read the rank-averaged loss (and stop signals), clip, check the norm, step; return the signals."""
        loss_total, signals = _all_reduce_sum([loss.item(), float(stop_flag.signum is not None)], self.world)
        self.train_loss = loss_total / self.world.world_size
        if not math.isfinite(self.train_loss):
            raise _non_finite("training loss", self.train_loss, self.step + 1, self.last_ckpt,
                              "stopped before the optimizer step")
        self.grad_norm = None
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.grad_norm = norm.item()
            if not math.isfinite(self.grad_norm):
                raise _non_finite("gradient norm", self.grad_norm, self.step + 1, self.last_ckpt,
                                  "stopped before the optimizer step")
        self.optimizer.step()
        return signals

    def _deferred_read(self, stop_flag: _StopFlag) -> float:
        """With deferred reads: read the pending losses when due; return the ranks' stop signals (0 if not read)."""
        cfg, step = self.cfg, self.step
        if not (step % _DEFERRED_READ_EVERY == 0 or self._eval_due() or step % cfg.log_every == 0
                or step % cfg.checkpoint_every == 0 or (cfg.halt_at_step is not None and step >= cfg.halt_at_step)):
            return 0.0
        # the host reads the losses of the steps since the last read (waiting for the GPU once)
        self.train_loss, self.grad_norm = _read_pending(self.pending, self.last_ckpt)
        return _all_reduce_sum([float(stop_flag.signum is not None)], self.world)[0]

    def _eval_due(self) -> bool:
        return self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps

    def _stop_reason(self, signals: float, stop_flag: _StopFlag) -> str:
        halt = self.cfg.halt_at_step is not None and self.step >= self.cfg.halt_at_step
        if signals > 0:
            self.signum = stop_flag.signum or signal.SIGTERM  # another rank's signal: report SIGTERM
            return "signal"
        if halt and self.step < self.cfg.max_steps:
            return "halted"
        return "finished"

    def evaluate(self) -> float | None:
        """Mean validation loss over the same ``n_val`` sequences every time (split over the ranks)."""
        if self.n_val == 0:
            return None
        cfg, world = self.cfg, self.world
        per_rank = self.n_val // world.dp_size
        first = world.dp_rank * per_rank
        total = 0.0
        self.train_model.eval()
        with torch.no_grad():
            for lo in range(first, first + per_rank, cfg.micro_batch_size):
                rows = val_batch(self.val_shards, cfg.seq_len, range(lo, min(lo + cfg.micro_batch_size, first + per_rank)))
                rows = rows.to(self.device, non_blocking=True)
                with self.autocast():
                    logits = self.train_model(input_ids=rows[:, :-1], use_cache=False).logits
                total += lm_loss(logits, rows[:, 1:]).item() * len(rows)
        self.train_model.train()
        return _all_reduce_sum([total], world)[0] / world.tp_size / self.n_val  # each TP rank holds its replica's total

    def log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def _log_step(self, lr: float, evaluated: bool, bar) -> None:
        """A metrics record at log steps, evaluation steps and the last step (rank 0)."""
        cfg, step = self.cfg, self.step
        if self.logger is None or not (step % cfg.log_every == 0 or evaluated or step == cfg.max_steps):
            return
        tps = self.window_tokens / self.window_time if self.window_time > 0 else None
        peak = self.peak_tflops
        record = {"step": step, "tokens": self.tokens, "loss": self.train_loss,
                  "val_loss": self.val_loss if evaluated else None, "lr": lr, "grad_norm": self.grad_norm,
                  "tokens_per_s": tps,
                  "mfu": (tps * self.flops_per_token / (peak * 1e12 * self.world.world_size)) if tps and peak else None,
                  "memory_gb": memory_gb(self.device), "elapsed_s": time.perf_counter() - self.start_time}
        self.log(record)
        if self.log_lines:
            print(log_line(record, cfg.max_steps), flush=True)
        self.window_time, self.window_tokens = 0.0, 0
        if evaluated and self.val_loss is not None:
            bar.write(f"step {step}: train loss {self.train_loss:.4f}, val loss {self.val_loss:.4f}")

    def save(self) -> Path:
        """Checkpoint the current step (collectively: every rank calls this)."""
        state = {"step": self.step, "tokens": self.tokens, "scheduler": self.scheduler.state_dict(),
                 "data": self.batches.state_dict(), "config": self.cfg.to_dict(), "model_config": model_config_dict(self.mconfig),
                 "world_size": self.world.world_size, "val_loss": self.val_loss}
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, state,
                                    self.cfg.keep_checkpoints)

    def _profile_start(self) -> None:
        cfg = self.cfg
        if cfg.profile_steps and self.world.is_main and self.step == min(10, cfg.max_steps - 1) and self.profiler is None:
            self.profiler = _start_profiler(self.device)

    def _profile_stop(self) -> None:
        if self.profiler is not None and self.step >= min(10, self.cfg.max_steps - 1) + self.cfg.profile_steps:
            _write_profile(self.profiler, self.run_dir, self.device)
            self.profiler = None

    def _result(self, stopped: str, export_dir: Path | None) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, step=self.step, tokens=self.tokens, val_loss=self.val_loss,
                           export_dir=export_dir, stopped=stopped, checkpoint=self.last_ckpt,
                           signal=getattr(self, "signum", None) if stopped == "signal" else None)

    def _finish(self, stopped: str) -> TrainResult:
        """Export a finished run to RUN_DIR/final and say how the run ended."""
        export_dir = None
        if stopped == "finished" and self.cfg.export:
            export_dir = export_hf(self.model, self.mconfig, self.tokenizer_dir,
                                   self.run_dir / "final", self.world)
        if self.world.is_main:
            if stopped == "signal":
                print(f"stopped by a signal at step {self.step}; checkpoint {self.last_ckpt}; continue with --resume")
            elif stopped == "halted":
                print(f"halted at step {self.step} (halt_at_step); checkpoint {self.last_ckpt}; continue with --resume")
            else:
                print(f"finished {self.step} steps ({self.tokens:,} tokens); val loss {self.val_loss}; "
                      f"model exported to {export_dir}")
        return self._result(stopped, export_dir)


def _start_profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=False)
    prof.__enter__()
    return prof


def _write_profile(prof, run_dir: Path, device: torch.device) -> None:
    """The profiled steps: RUN_DIR/profile.txt (operators and kernels by time) and a Chrome trace."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    prof.__exit__(None, None, None)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (run_dir / "profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
    prof.export_chrome_trace(str(run_dir / "profile_trace.json"))


def export_hf(model, mconfig, tokenizer_dir: Path, out: Path, world: Dist) -> Path | None:
    """Write ``out`` (save_pretrained + tokenizer) atomically from rank 0; every rank must call it."""
    import os
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoTokenizer

    from tpa import T6ForCausalLM
    from tpa.models.t6 import save_model_and_tokenizer

    from tpa.parallel import to_plain

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state, _ = to_plain(model, state)  # a tensor-parallel model's fused projections as one weight each
    if world.is_main:
        plain = T6ForCausalLM(mconfig)
        plain.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        plain.generation_config.bos_token_id = mconfig.bos_token_id
        plain.generation_config.eos_token_id = mconfig.eos_token_id
        plain.generation_config.pad_token_id = mconfig.pad_token_id
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # checks that the tokenizer fits the model's vocabulary before anything is written
        save_model_and_tokenizer(plain, AutoTokenizer.from_pretrained(tokenizer_dir), tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    if world.enabled:
        dist.barrier()
    return out
