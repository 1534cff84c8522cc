"""``tpa bench train``: training tokens/s, MFU and peak memory of each attention type at one preset.

Two loops, side by side in one run (``--loops``):

- ``trainer``: each (attention type, ``--compile`` on/off) pair is a short run of the project's training
  loop (:func:`tpa.train.trainer.train`, one process, no gradient accumulation, compiled blocks when
  on) on prepared token shards (``--data``), logging every step.
- ``model-compile``: the loop users write around a transformers model, here in this file:
  ``torch.compile(model)`` of the whole model, the loss from ``forward(input_ids, labels=input_ids)``,
  bf16 autocast (``--precision``), fused AdamW (on CUDA), grad-norm clipping at 1.0, one
  synchronisation per step for its clock. Random token ids (throughput does not depend on them), so
  it needs no data. With ``--reference llama`` (default) transformers' own ``LlamaForCausalLM`` of the
  preset's MHA size (width, layers, heads, head size, MLP size, vocabulary, tied embedding) runs first
  in the same loop: the reference row.

A batch is ``--micro-batch`` sequences of ``--seq-len`` tokens per step. The first ``--warmup`` steps
(compilation, allocator growth, autotuning) are not timed; the next ``--steps`` are. Reported:

- tokens/s: timed tokens over the timed steps' time (each loop's own per-step clock);
- MFU: model-FLOPs utilisation (6 x matmul parameters + attention per token, over the accelerator's
  dense bf16 peak; on a CPU there is no peak, so none unless ``--peak-tflops``), median over steps;
- peak memory: on a GPU the CUDA allocator's peak during the run (reset before each run); on a CPU
  the process's peak resident set size so far (it only grows, so it is an upper bound per run).

The vocabulary defaults to the paper's (50,304) whatever the data's tokenizer, so the output layer
costs what it costs in the paper's models. Writes ``train.json``, ``train.csv`` and ``train.md``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

from tpa.utils.args import UsageError

FIELDS = ["model", "attention_type", "loop", "compile", "compile_mode", "parameters", "heads", "status", "tokens_per_s",
          "median_tokens_per_s", "mfu", "peak_memory_gb", "micro_batch", "seq_len", "timed_steps", "warmup_steps"]
LOOPS = ("trainer", "model-compile")
T6, LLAMA = "T6ForCausalLM", "LlamaForCausalLM"


def _run(args) -> int:
    from tpa.bench.runs import RunInterrupted

    try:
        record = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"error: interrupted: {err}; the finished runs are in the outputs", file=sys.stderr)
        return 1
    if any(r["status"].startswith("error") for r in record["rows"]):
        print("error: some runs failed; see train.json", file=sys.stderr)
        return 1
    return 0


def _check_args(args) -> list[str]:
    """Validate the arguments; returns the attention types."""
    from tpa.models.presets import ATTENTION_TYPES, PRESETS
    from tpa.utils.args import parse_list

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    types = parse_list(args.types, ATTENTION_TYPES, "attention type")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError(f"need --steps >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    for name in ("micro_batch", "seq_len", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if "trainer" in args.loops:
        from tpa.bench.runs import check_data_dir

        meta = check_data_dir(args.data)
        if args.vocab_size < meta["vocab_size"]:
            raise UsageError(f"--vocab-size {args.vocab_size} is smaller than the data's tokenizer "
                             f"({meta['vocab_size']})")
    return types


def _plan(args, types: list[str]) -> list[dict]:
    """The runs in order: the trainer's (compile off, then on), then the whole-model-compile loop's
    (the LLaMA reference first)."""
    jobs = []
    if "trainer" in args.loops:
        for compile_ in {"both": [False, True], "on": [True], "off": [False]}[args.compile]:
            jobs += [{"model": T6, "attention_type": t, "loop": "trainer", "compile": compile_} for t in types]
    if "model-compile" in args.loops:
        if args.reference == "llama":
            jobs.append({"model": LLAMA, "attention_type": "mha", "loop": "model-compile", "compile": True,
                         "compile_mode": args.compile_mode})
        jobs += [{"model": T6, "attention_type": t, "loop": "model-compile", "compile": True,
                  "compile_mode": args.compile_mode} for t in types]
    return jobs


def run(args) -> dict:
    """Run every planned (loop, model, type, compile) job, write the files, return the JSON record."""
    import torch

    from tpa.bench.runs import RunInterrupted
    from tpa.utils.devices import resolve_device
    from tpa.utils.files import print_written
    from tpa.utils.runinfo import run_metadata
    from tpa.utils.tables import fmt_float
    from tpa.train.config import preset_values

    types = _check_args(args)
    device = resolve_device(args.device)
    defaults = preset_values(args.preset)
    micro = args.micro_batch or defaults.get("micro_batch_size", 16)
    seq_len = args.seq_len or defaults.get("seq_len", 256)
    out = Path(args.output)
    start = time.perf_counter()
    record = {"preset": args.preset, "data": args.data if "trainer" in args.loops else None, "micro_batch": micro,
              "seq_len": seq_len, "vocab_size": args.vocab_size, "precision": args.precision, "steps": args.steps,
              "warmup": args.warmup, "loops": list(args.loops), "compile_backend": args.compile_backend,
              "compile_mode": args.compile_mode,
              "complete": False, "rows": [], "seconds": None, "run": run_metadata(device)}
    rows = record["rows"]
    interrupted = None
    for job in _plan(args, types):
        row = {**job, "micro_batch": micro, "seq_len": seq_len, "timed_steps": args.steps,
               "warmup_steps": args.warmup}
        name = f"{job['model']} {job['attention_type']} {_loop_label(job)}"
        if interrupted is not None:
            rows.append({**row, "status": "skipped (interrupted)"})
            continue
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            if job["loop"] == "trainer":
                measured = _trainer_job(job, args, defaults, micro, seq_len, device, out)
            else:
                measured = _model_compile_job(job, args, micro, seq_len, device)
        except UsageError:
            raise
        except RunInterrupted as err:
            interrupted = err
            rows.append({**row, "status": "interrupted"})
            continue
        except Exception as err:  # noqa: BLE001 - record the failure, go on with the other runs
            if device.type == "cuda" and isinstance(err, torch.cuda.OutOfMemoryError):
                rows.append({**row, "status": "OOM"})
            else:
                rows.append({**row, "status": f"error: {type(err).__name__}: {err}"})
            print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            continue
        finally:
            gc.collect()
        rows.append({**row, "status": "ok", **measured})
        print(f"{name}: {measured['tokens_per_s'] or 0:,.0f} tokens/s, MFU {fmt_float(measured['mfu'])}, peak "
              f"{fmt_float(measured['peak_memory_gb'], 2)} GiB", flush=True)
        record["seconds"] = time.perf_counter() - start
        _write(record, out, device)  # after every run: an interrupted benchmark keeps what it measured
    record["complete"] = interrupted is None
    record["seconds"] = time.perf_counter() - start
    paths, text = _write(record, out, device)
    print(text, end="")
    print_written(paths)
    if interrupted is not None:
        raise interrupted
    return record


def _trainer_job(job: dict, args, defaults: dict, micro: int, seq_len: int, device, out: Path) -> dict:
    """One short run of the project's trainer; its logged metrics."""
    from tpa.bench.runs import throughput, training_run

    t, compile_ = job["attention_type"], job["compile"]
    total_steps = args.warmup + args.steps
    values = dict(preset=args.preset, attention_type=t, data_dir=args.data, seq_len=seq_len,
                  global_batch_size=micro, micro_batch_size=micro, max_steps=total_steps,
                  warmup_steps=min(defaults.get("warmup_steps", 0), total_steps), eval_every=total_steps,
                  eval_sequences=micro, log_every=1, checkpoint_every=total_steps, keep_checkpoints=1,
                  export=False, device=str(device), precision=args.precision, parallel="none",
                  compile=compile_, vocab_size=args.vocab_size, peak_tflops=args.peak_tflops)
    run_ = training_run(values, out / "runs" / f"{t}-compile-{'on' if compile_ else 'off'}")
    mc = run_["model_config"]
    return {"parameters": _parameters(mc), "heads": mc["num_attention_heads"],
            **throughput(run_["records"], skip_steps=args.warmup)}


def _model_compile_job(job: dict, args, micro: int, seq_len: int, device) -> dict:
    """Build the job's model at the preset's size and time it under the whole-model-compile loop."""
    import torch

    from tpa import T6Config, T6ForCausalLM

    torch.manual_seed(0)
    config = T6Config.from_preset(args.preset, job["attention_type"], vocab_size=args.vocab_size,
                                  max_position_embeddings=seq_len)
    model = T6ForCausalLM(config) if job["model"] == T6 else _llama_like(config)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
    try:
        measured = model_compile_loop(model, micro=micro, seq_len=seq_len, steps=args.steps, warmup=args.warmup,
                                      device=device, bf16=bf16, backend=args.compile_backend, mode=args.compile_mode,
                                      peak_tflops=args.peak_tflops, profile_path=_profile_path(job, args))
    finally:
        del model
        torch._dynamo.reset()
    return {"parameters": measured.pop("parameters"), "heads": config.num_attention_heads, **measured}


def _profile_path(job: dict, args) -> Path | None:
    return Path(args.output) / f"profile_{job['model']}_{job['attention_type']}.txt" if args.profile else None


def _llama_like(config):
    """transformers' ``LlamaForCausalLM`` of the size of the MHA T6 ``config`` (SDPA attention, no bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.attention_type != "mha":
        raise ValueError(f"the LLaMA reference is the MHA model's twin, got attention_type {config.attention_type!r}")
    llama = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        initializer_range=config.initializer_range, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, use_cache=False,
        attn_implementation="sdpa")
    return LlamaForCausalLM(llama)


def model_compile_loop(model, *, micro: int, seq_len: int, steps: int, warmup: int, device, bf16: bool,
                       backend: str = "inductor", mode: str | None = None, peak_tflops: float | None = None,
                       profile_path: Path | None = None, profile_steps: int = 3) -> dict:
    """Train ``model`` the way users write it around a transformers causal LM, and time it.

    ``torch.compile(model, backend=backend, mode=mode)``; per step: ``loss = compiled(input_ids=ids, labels=ids).loss`` under bf16
    autocast when ``bf16``, backward, ``clip_grad_norm_(1.0)``, AdamW (fused on CUDA), ``zero_grad``;
    ids ``[micro, seq_len]`` random in the model's vocabulary. The first ``warmup`` steps are untimed.
    With a CUDA-graph ``mode`` (``reduce-overhead``, ``max-autotune``) each step first marks a new
    step for cudagraph trees (``torch.compiler.cudagraph_mark_step_begin``), as their docs ask of a loop.
    With ``profile_path``, ``profile_steps`` more steps run after the timed ones under torch.profiler
    (so the timing is not disturbed) and its table, sorted by GPU time (CPU time on a CPU), is written there.

    Returns ``tokens_per_s`` (timed tokens over timed time), ``median_tokens_per_s``, ``mfu`` (median;
    None without a peak), ``peak_memory_gb``, ``timed_steps_tokens``, ``parameters`` and ``final_loss``.
    """
    import contextlib
    import math

    import torch

    from tpa.bench.runs import RunInterrupted
    from tpa.train import metrics

    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True if device.type == "cuda" else None)
    compiled = torch.compile(model, backend=backend, mode=mode)
    graphs = mode in ("reduce-overhead", "max-autotune")
    generator = torch.Generator().manual_seed(0)
    batches = torch.randint(0, model.config.vocab_size, (warmup + steps, micro, seq_len), generator=generator)
    batches = batches.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step(ids):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times = []
    try:
        for step in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            loss = train_step(batches[step])
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        if profile_path is not None:
            _profile_steps(train_step, batches[-1], profile_steps, device, Path(profile_path))
    except KeyboardInterrupt:
        raise RunInterrupted(f"the {type(model).__name__} model-compile run stopped at step {step}") from None
    final_loss = float(loss.detach())
    if not math.isfinite(final_loss):
        raise RuntimeError(f"the loss is not finite after {warmup + steps} steps ({final_loss})")
    tokens = micro * seq_len
    peak = peak_tflops or metrics.peak_tflops(device)
    flops = metrics.flops_per_token(model, model.config, seq_len)
    median_speed = tokens / statistics.median(times)
    return {"tokens_per_s": tokens * len(times) / sum(times), "median_tokens_per_s": median_speed,
            "mfu": flops * median_speed / (peak * 1e12) if peak else None, "peak_memory_gb": metrics.memory_gb(device),
            "timed_steps_tokens": tokens * len(times), "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": final_loss}


def _profile_steps(train_step, ids, steps: int, device, path: Path) -> None:
    """Run ``steps`` calls of ``train_step(ids)`` under torch.profiler; write its table to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tpa.utils.files import atomic_write_text

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = f"{steps} profiled steps of torch.compile(model), after the timed ones\n"
    atomic_write_text(path, header + prof.key_averages().table(sort_by=sort, row_limit=50, max_name_column_width=110))


def _loop_label(row: dict) -> str:
    if row["loop"] == "model-compile":
        mode = row.get("compile_mode")
        return f'torch.compile(model, mode="{mode}")' if mode else "torch.compile(model)"
    return "trainer, compiled blocks" if row["compile"] else "trainer, eager"


def _write(record: dict, out: Path, device):
    from tpa.utils.files import atomic_write_csv, atomic_write_json, atomic_write_text
    from tpa.utils.tables import fmt_float, fmt_int, markdown_table

    info = record["run"]
    mem_note = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS so far"
    table = markdown_table(
        ["model", "type", "loop", "params", "tokens/s", "MFU", f"peak memory (GiB, {mem_note})", "status"],
        [[r["model"], r["attention_type"], _loop_label(r), fmt_int(r.get("parameters")),
          fmt_int(round(r["tokens_per_s"])) if r.get("tokens_per_s") else "",
          f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
          fmt_float(r.get("peak_memory_gb"), 2), r["status"][:80]] for r in record["rows"]],
        align="lllrrrrl")
    text = (f"Training throughput: preset {record['preset']}, {record['micro_batch']} x {record['seq_len']} tokens per "
            f"step, vocabulary {record['vocab_size']}, precision {record['precision']}, {record['steps']} timed steps "
            f"after {record['warmup']} warm-up steps; {info['device_name']}, {info['date']}"
            + ("" if record["complete"] else " (incomplete)") + ".\n\n" + table)
    paths = [atomic_write_json(out / "train.json", record), atomic_write_csv(out / "train.csv", record["rows"], FIELDS),
             atomic_write_text(out / "train.md", text)]
    return paths, text


def _parameters(model_config: dict) -> int:
    from tpa import T6Config
    from tpa.bench.memory import model_parameters

    return model_parameters(T6Config.from_dict(model_config))
