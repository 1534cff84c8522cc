"""The training loop: one process on a CPU or GPU, or torchrun ranks with DDP or FSDP2.

Read top to bottom, :func:`train` does what nanoGPT's ``train.py`` does, with typed configuration and
exact resumption: set up the process group, build the model from its preset, apply
:func:`~tpa.train.parallel.parallelize`, make AdamW (weight decay on matrices only) and the cosine
schedule, restore the latest checkpoint when resuming, then loop: fetch this rank's slice of the
global batch, accumulate gradients over micro-batches, reduce the loss, stop on a non-finite one,
clip, step, log, evaluate, checkpoint. At the end it exports a HuggingFace model directory.
``--init-from`` starts from a model directory instead of a fresh model, and ``--distill-from`` adds
a teacher's KL term to the loss (:mod:`tpa.train.distill`).
"""

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
from tpa.data.prepare import read_meta
from tpa.train import checkpoint as ckpt
from tpa.train.config import TrainConfig, save_yaml
from tpa.train.distill import DISTILL_FIELDS, load_init_model, make_distiller
from tpa.train.metrics import (MetricsLogger, check_logging_packages, flops_per_token, log_line, memory_gb,
                               peak_tflops, run_info)
from tpa.train.parallel import Dist, parallelize, resolve_parallel, setup_distributed, teardown_distributed

# T6Config fields that must agree between a checkpoint and the run that resumes it.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                       "intermediate_size", "attention_type", "q_rank", "k_rank", "v_rank", "num_key_value_heads",
                       "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "tie_word_embeddings")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite; no optimizer step or checkpoint was taken."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    val_loss: float | None
    export_dir: Path | None
    stopped: str  # "finished", "halted" (halt_at_step), "signal" or "exported" (export_only)
    checkpoint: Path | None


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
        what = ("training loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            raise NonFiniteLoss(
                f"the {what[0]} is {what[1]} at step {step}; the optimizer skipped that step's update and the run "
                f"stopped at the next read of the loss (step {rows[-1][0]}; host_sync='deferred'). "
                f"The last good checkpoint is {last_ckpt or 'none (nothing was saved yet)'}. "
                "Lower the learning rate, check the data, or resume from that checkpoint.")
    return rows[-1][1], rows[-1][2]


def _train(cfg: TrainConfig, world: Dist, argv: list[str]) -> TrainResult:
    from tqdm.auto import tqdm

    from tpa import T6ForCausalLM

    # every rank, before any work: a missing TensorBoard / W&B package stops all ranks at once
    check_logging_packages(tensorboard=cfg.tensorboard and not cfg.export_only,
                           wandb_project=None if cfg.export_only else cfg.wandb_project)
    device = world.device
    run_dir = cfg.resolved_run_dir()
    ckpt_dir = run_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(ckpt_dir) if cfg.resume else None
    if not cfg.resume and ckpt.list_checkpoints(ckpt_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another --run-dir")

    # ---- data
    meta = read_meta(cfg.data_dir)
    train_shards = TokenShards(cfg.data_dir, "train")
    val_shards = TokenShards(cfg.data_dir, "val") if meta["splits"]["val"]["tokens"] else None
    batches = TrainBatches(train_shards, cfg.seq_len, cfg.data_seed)
    if cfg.global_batch_size % (cfg.micro_batch_size * world.dp_size):
        raise ValueError(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size="
                         f"{cfg.micro_batch_size} x data-parallel size {world.dp_size}")
    accum = cfg.global_batch_size // (cfg.micro_batch_size * world.dp_size)

    # ---- model
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        mconfig, model = load_init_model(cfg.init_from, int(meta["vocab_size"]), cfg.seq_len)
        model = model.to(device)
    else:
        mconfig = build_model_config(cfg, meta)
        model = T6ForCausalLM(mconfig).to(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    mode = resolve_parallel(cfg.parallel, world)
    train_model = parallelize(model, parallel=mode, world=world, bf16=bf16, compile=cfg.compile,
                              activation_checkpointing=cfg.activation_checkpointing)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 and mode != "fsdp" \
        else contextlib.nullcontext
    loss_fn = torch.compile(lm_loss) if cfg.compile else lm_loss
    distiller = make_distiller(cfg, mconfig.vocab_size, device, mode, world, bf16, autocast)

    # ---- optimizer and schedule
    groups = param_groups(model, cfg.weight_decay)
    if cfg.host_sync == "deferred" and mode == "fsdp":
        raise ValueError("host_sync='deferred' needs the fused AdamW, which FSDP2 runs do not use")
    deferred = cfg.host_sync == "deferred" or (cfg.host_sync == "auto" and device.type == "cuda" and mode != "fsdp"
                                                  and world.tp_size == 1)
    # the fused AdamW skips a step on the device when told a value was not finite (found_inf)
    fused = (device.type == "cuda" and mode != "fsdp") or deferred
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=fused or None, foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr_factor(
        s, warmup=cfg.warmup_steps, max_steps=cfg.max_steps, min_ratio=cfg.min_lr / cfg.lr))

    step, tokens, val_loss = 0, 0, None
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)["model_config"]
        diff = {k: (saved.get(k), getattr(mconfig, k)) for k in ARCHITECTURE_FIELDS
                if saved.get(k) != getattr(mconfig, k, None)}
        if diff:
            raise ValueError(f"{resume_from} was trained with another architecture (checkpoint, this run): {diff}")
        saved_cfg = ckpt.read_trainer_state(resume_from)["config"]
        defaults = TrainConfig()  # checkpoints from before these fields hold their defaults
        diff = {k: (saved_cfg.get(k, getattr(defaults, k)), getattr(cfg, k)) for k in DISTILL_FIELDS
                if saved_cfg.get(k, getattr(defaults, k)) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"{resume_from} was trained with other init/distillation settings (checkpoint, this run): "
                             f"{diff}")
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        step, tokens, val_loss = state["step"], state["tokens"], state.get("val_loss")
    elif cfg.resume and world.is_main:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
    if cfg.export_only:
        if resume_from is None:
            raise ValueError(f"--export-only: no checkpoint in {ckpt_dir} to export")
        out = export_hf(model, mconfig, Path(cfg.data_dir) / meta["tokenizer"], run_dir / f"export_step_{step:08d}",
                        world)
        if world.is_main:
            print(f"exported {resume_from} (step {step}) to {out}")
        return TrainResult(run_dir=run_dir, step=step, tokens=tokens, val_loss=val_loss, export_dir=out,
                           stopped="exported", checkpoint=resume_from)

    # ---- run directory and metrics
    logger = None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        mconfig.to_json_file(str(run_dir / "model_config.json"))
        import json

        with open(run_dir / "run_info.jsonl", "a") as f:
            info = run_info(device, world.world_size, argv)
            info.update(parallel=mode, bf16=bf16, gradient_accumulation=accum, resumed_from=str(resume_from or ""),
                        parameters=sum(p.numel() for p in model.parameters()))
            f.write(json.dumps(info) + "\n")
        logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                               config=cfg.to_dict(), resume=resume_from is not None)

    flops_tok = flops_per_token(model, mconfig, cfg.seq_len)
    peak = cfg.peak_tflops or peak_tflops(device)
    n_val = 0
    if val_shards is not None:
        n_val = val_sequences(val_shards, cfg.seq_len, cfg.eval_sequences) // world.dp_size * world.dp_size

    def evaluate() -> float | None:
        if n_val == 0:
            return None
        per_rank = n_val // world.dp_size
        first = world.dp_rank * per_rank
        total = 0.0
        train_model.eval()
        with torch.no_grad():
            for lo in range(first, first + per_rank, cfg.micro_batch_size):
                rows = val_batch(val_shards, cfg.seq_len, range(lo, min(lo + cfg.micro_batch_size, first + per_rank)))
                rows = rows.to(device, non_blocking=True)
                with autocast():
                    logits = train_model(input_ids=rows[:, :-1], use_cache=False).logits
                total += lm_loss(logits, rows[:, 1:]).item() * len(rows)
        train_model.train()
        return _all_reduce_sum([total], world)[0] / world.tp_size / n_val  # each TP rank holds its replica's total

    def save(step_: int) -> Path:
        state = {"step": step_, "tokens": tokens, "scheduler": scheduler.state_dict(), "data": batches.state_dict(),
                 "config": cfg.to_dict(), "model_config": mconfig.to_dict(), "world_size": world.world_size,
                 "val_loss": val_loss}
        return ckpt.save_checkpoint(ckpt_dir, step_, model, optimizer, state, cfg.keep_checkpoints)

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{cfg.preset}-{cfg.attention_type}", unit="step",
               disable=(not world.is_main) or (None if cfg.progress is None else not cfg.progress), dynamic_ncols=True)
    # without a terminal (a file, a pipe) the bar draws nothing useful: one plain line per log step instead
    log_lines = world.is_main and (bar.disable or not sys.stdout.isatty())
    last_ckpt = resume_from
    stopped = "finished"
    profiler = None
    failed = True
    try:
        if step == 0:
            val_loss = evaluate()
            if logger is not None:
                logger.log({"step": 0, "tokens": 0, "val_loss": val_loss, "lr": scheduler.get_last_lr()[0]})
        window_time, window_tokens = 0.0, 0
        pending: list[tuple] = []  # deferred host reads: (step, loss, grad norm, not-finite flag) on the device
        train_loss = grad_norm = None
        start_time = time.perf_counter()
        train_model.train()
        with _StopFlag() as stop_flag:
            while step < cfg.max_steps:
                if cfg.profile_steps and world.is_main and step == min(10, cfg.max_steps - 1) and profiler is None:
                    profiler = _start_profiler(device)
                t0 = time.perf_counter()
                rows = batches.next_batch(cfg.global_batch_size, world.dp_rank, world.dp_size)
                if device.type == "cuda":
                    rows = rows.pin_memory()
                rows = rows.to(device, non_blocking=True)
                loss_sum = torch.zeros((), device=device)
                for k, micro in enumerate(rows.split(cfg.micro_batch_size)):
                    last = k == accum - 1
                    sync = contextlib.nullcontext()
                    if mode == "ddp" and not last:
                        sync = train_model.no_sync()
                    elif mode == "fsdp":
                        model.set_requires_gradient_sync(last)
                    with sync:
                        with autocast():
                            logits = train_model(input_ids=micro[:, :-1], use_cache=False).logits
                        loss = loss_fn(logits, micro[:, 1:])
                        if distiller is not None:
                            loss = loss + distiller(logits, micro[:, :-1])
                        (loss / accum).backward()
                    loss_sum += loss.detach()
                lr = scheduler.get_last_lr()[0]
                if deferred:
                    _deferred_optimizer_step(model, optimizer, loss_sum / accum, cfg.grad_clip, world, pending, step + 1)
                else:
                    loss_total, signals = _all_reduce_sum(
                        [loss_sum.item() / accum, float(stop_flag.signum is not None)], world)
                    train_loss = loss_total / world.world_size
                    if not math.isfinite(train_loss):
                        raise NonFiniteLoss(
                            f"the training loss is {train_loss} at step {step + 1}; stopped before the optimizer step. "
                            f"The last good checkpoint is {last_ckpt or 'none (nothing was saved yet)'}. "
                            "Lower the learning rate, check the data, or resume from that checkpoint.")
                    grad_norm = None
                    if cfg.grad_clip > 0:
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                        grad_norm = norm.item()
                        if not math.isfinite(grad_norm):
                            raise NonFiniteLoss(
                                f"the gradient norm is {grad_norm} at step {step + 1}; stopped before the optimizer "
                                f"step. The last good checkpoint is {last_ckpt or 'none (nothing was saved yet)'}.")
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_tokens = cfg.global_batch_size * cfg.seq_len
                tokens += step_tokens
                will_eval = step % cfg.eval_every == 0 or step == cfg.max_steps
                if deferred and (step % _DEFERRED_READ_EVERY == 0 or will_eval or step % cfg.log_every == 0
                                 or step % cfg.checkpoint_every == 0
                                 or (cfg.halt_at_step is not None and step >= cfg.halt_at_step)):
                    # the host reads the losses of the steps since the last read (waiting for the GPU once)
                    train_loss, grad_norm = _read_pending(pending, last_ckpt)
                    signals = _all_reduce_sum([float(stop_flag.signum is not None)], world)[0]
                elif deferred:
                    signals = 0.0
                window_time += time.perf_counter() - t0
                window_tokens += step_tokens

                evaluated = False
                if will_eval:
                    val_loss = evaluate()
                    evaluated = True
                if logger is not None and (step % cfg.log_every == 0 or evaluated or step == cfg.max_steps):
                    tps = window_tokens / window_time if window_time > 0 else None
                    record = {"step": step, "tokens": tokens, "loss": train_loss,
                              "val_loss": val_loss if evaluated else None, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tps,
                              "mfu": (tps * flops_tok / (peak * 1e12 * world.world_size)) if tps and peak else None,
                              "memory_gb": memory_gb(device), "elapsed_s": time.perf_counter() - start_time}
                    logger.log(record)
                    if log_lines:
                        print(log_line(record, cfg.max_steps), flush=True)
                    window_time, window_tokens = 0.0, 0
                    if evaluated and val_loss is not None:
                        bar.write(f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                if profiler is not None and step >= min(10, cfg.max_steps - 1) + cfg.profile_steps:
                    _write_profile(profiler, run_dir, device)
                    profiler = None
                bar.update(1)
                if train_loss is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")

                halt = cfg.halt_at_step is not None and step >= cfg.halt_at_step
                if signals > 0:
                    stopped = "signal"
                elif halt and step < cfg.max_steps:
                    stopped = "halted"
                if stopped != "finished" or step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    last_ckpt = save(step)
                if stopped != "finished":
                    break
        failed = False
    finally:
        if profiler is not None:
            _write_profile(profiler, run_dir, device)
        bar.close()
        if logger is not None:
            logger.close(failed=failed)

    export_dir = None
    if stopped == "finished" and cfg.export:
        export_dir = export_hf(model, mconfig, Path(cfg.data_dir) / meta["tokenizer"], run_dir / "final", world)
    if world.is_main:
        if stopped == "signal":
            print(f"stopped by a signal at step {step}; checkpoint {last_ckpt}; continue with --resume")
        elif stopped == "halted":
            print(f"halted at step {step} (halt_at_step); checkpoint {last_ckpt}; continue with --resume")
        else:
            print(f"finished {step} steps ({tokens:,} tokens); val loss {val_loss}; model exported to {export_dir}")
    return TrainResult(run_dir=run_dir, step=step, tokens=tokens, val_loss=val_loss, export_dir=export_dir,
                       stopped=stopped, checkpoint=last_ckpt)


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

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
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
