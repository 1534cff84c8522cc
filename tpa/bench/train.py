"""``tpa bench train``: training tokens/s, MFU and peak memory of each attention type at one preset.

Each (attention type, torch.compile on/off) pair is a short run of the project's training loop
(:func:`tpa.train.trainer.train`, one process, no gradient accumulation) on prepared token shards
(``--data``), with a batch of ``--micro-batch`` sequences of ``--seq-len`` tokens per step, logging
every step. The first ``--warmup`` steps (compilation, allocator growth, cuDNN/cuBLAS autotuning)
are not timed; the next ``--steps`` are. Reported:

- tokens/s: timed tokens over the timed steps' time (the loop's own per-step clock);
- MFU: the loop's model-FLOPs utilisation (6 x matmul parameters + attention per token, over the
  accelerator's dense bf16 peak; on a CPU there is no peak, so none), median over timed steps;
- peak memory: on a GPU the CUDA allocator's peak during the run (reset before each run); on a CPU
  the process's peak resident set size so far (it only grows, so it is an upper bound per run).

The vocabulary defaults to the paper's (50,304) whatever the data's tokenizer, so the output layer
costs what it costs in the paper's models. Writes ``train.json``, ``train.csv`` and ``train.md``.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from tpa.utils.args import UsageError

FIELDS = ["attention_type", "compile", "parameters", "heads", "status", "tokens_per_s", "median_tokens_per_s", "mfu",
          "peak_memory_gb", "micro_batch", "seq_len", "timed_steps", "warmup_steps"]


def _run(args) -> int:
    from tpa.bench.runs import RunInterrupted

    try:
        record = run(args)
    except RunInterrupted as err:
        print(f"error: interrupted: {err}; the finished runs are in the outputs", file=sys.stderr)
        return 1
    if any(r["status"].startswith("error") for r in record["rows"]):
        print("error: some runs failed; see train.json", file=sys.stderr)
        return 1
    return 0


def run(args) -> dict:
    """Run every (type, compile) pair, write the files, return the JSON record."""
    import torch

    from tpa.bench.runs import RunInterrupted, check_data_dir, throughput, training_run
    from tpa.utils.args import parse_list
    from tpa.utils.devices import resolve_device
    from tpa.utils.files import print_written
    from tpa.utils.runinfo import run_metadata
    from tpa.utils.tables import fmt_float
    from tpa.models.presets import ATTENTION_TYPES, PRESETS
    from tpa.train.config import preset_values

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    types = parse_list(args.types, ATTENTION_TYPES, "attention type")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError(f"need --steps >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    for name in ("micro_batch", "seq_len", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    meta = check_data_dir(args.data)
    if args.vocab_size < meta["vocab_size"]:
        raise UsageError(f"--vocab-size {args.vocab_size} is smaller than the data's tokenizer ({meta['vocab_size']})")
    device = resolve_device(args.device)
    defaults = preset_values(args.preset)
    micro = args.micro_batch or defaults.get("micro_batch_size", 16)
    seq_len = args.seq_len or defaults.get("seq_len", 256)
    compiles = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    out = Path(args.output)
    start = time.perf_counter()
    record = {"preset": args.preset, "data": args.data, "micro_batch": micro, "seq_len": seq_len,
              "vocab_size": args.vocab_size, "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
              "complete": False, "rows": [], "seconds": None, "run": run_metadata(device)}
    rows = record["rows"]
    total_steps = args.warmup + args.steps
    interrupted = None
    for compile_ in compiles:
        for t in types:
            row = {"attention_type": t, "compile": compile_, "micro_batch": micro, "seq_len": seq_len,
                   "timed_steps": args.steps, "warmup_steps": args.warmup}
            if interrupted is not None:
                rows.append({**row, "status": "skipped (interrupted)"})
                continue
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                rows.append({**row, "status": "skipped (time budget)"})
                continue
            values = dict(preset=args.preset, attention_type=t, data_dir=args.data, seq_len=seq_len,
                          global_batch_size=micro, micro_batch_size=micro, max_steps=total_steps,
                          warmup_steps=min(defaults.get("warmup_steps", 0), total_steps), eval_every=total_steps,
                          eval_sequences=micro, log_every=1, checkpoint_every=total_steps, keep_checkpoints=1,
                          export=False, device=str(device), precision=args.precision, parallel="none",
                          compile=compile_, vocab_size=args.vocab_size, peak_tflops=args.peak_tflops)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                run_ = training_run(values, out / "runs" / f"{t}-compile-{'on' if compile_ else 'off'}")
            except UsageError:
                raise
            except RunInterrupted as err:
                interrupted = err
                rows.append({**row, "status": "interrupted"})
                continue
            except Exception as err:  # noqa: BLE001 - record the failure, go on with the other types
                if device.type == "cuda" and isinstance(err, torch.cuda.OutOfMemoryError):
                    rows.append({**row, "status": "OOM"})
                else:
                    rows.append({**row, "status": f"error: {type(err).__name__}: {err}"})
                print(f"{t} compile={compile_}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                continue
            finally:
                gc.collect()
            speed = throughput(run_["records"], skip_steps=args.warmup)
            mc = run_["model_config"]
            rows.append({**row, "status": "ok", "parameters": _parameters(mc), "heads": mc["num_attention_heads"],
                         **speed})
            print(f"{t} compile={'on' if compile_ else 'off'}: {speed['tokens_per_s'] or 0:,.0f} tokens/s, MFU "
                  f"{fmt_float(speed['mfu'])}, peak {fmt_float(speed['peak_memory_gb'], 2)} GiB", flush=True)
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


def _write(record: dict, out: Path, device):
    from tpa.utils.files import atomic_write_csv, atomic_write_json, atomic_write_text
    from tpa.utils.tables import fmt_float, fmt_int, markdown_table

    info = record["run"]
    mem_note = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS so far"
    table = markdown_table(
        ["type", "compile", "params", "tokens/s", "MFU", f"peak memory (GiB, {mem_note})", "status"],
        [[r["attention_type"], "on" if r["compile"] else "off", fmt_int(r.get("parameters")),
          fmt_int(round(r["tokens_per_s"])) if r.get("tokens_per_s") else "",
          f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
          fmt_float(r.get("peak_memory_gb"), 2), r["status"][:80]] for r in record["rows"]],
        align="llrrrrl")
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
