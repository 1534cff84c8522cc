"""``tpa ablate``: attention types or any grid of model variants trained side by side, with seeds.

Rows. By default (or with ``--types``) the rows are attention types at the preset: the paper's
Figure 4 in miniature. ``--row NAME:key=value,...`` (repeatable) and ``--rows FILE.yaml`` (a list
``rows:`` of mappings with a ``name``) add rows of any T6Config overrides, a learning rate, a head
count taken from another type (``heads_of``) and ``match_params`` (default: the head count is
chosen so that the row's attention parameters match MHA's, as the presets choose it; ``head_dim``:
fixed heads, narrowed head dimension; ``false``: fixed heads); see :mod:`tpa.bench.ablate_grid`.
The studies of ``studies/*.yaml`` are such files. Every row is trained once per seed, with the same
budget, data, data order, optimizer, schedule and evaluation; the table lists each row's settings.

Each run goes through the project's training loop (:func:`tpa.train.trainer.train`) at one preset,
whose head counts match the attention parameters across types (the paper's Table 10 for its sizes,
the same matching for ``tiny`` and ``mini``), on the same token shards, for the same number of
tokens, with the same optimizer and schedule (a row may set its own learning rate), once per seed
(``--seeds``, default one seed: ``--seed``, 0). The run of seed s initialises the model with seed s
and visits the training windows in the order of data seed ``--data-seed`` + s: every row sees the
same initialisation seed and the same sequences in the same order within a seed, and seeds vary both
sources of noise. A seed's runs are the same whichever other seeds or rows are run beside them, so
an ablation can be split over several calls and merged. Then it writes

- ``loss.png``: training and validation loss against tokens, one line per row (with several seeds:
  the mean over seeds, with a band from the lowest to the highest seed);
- ``ablation.md``: final validation loss and perplexity, KV-cache bytes per token (all layers, bf16),
  parameters (whole model and attention per layer) and training tokens/s per row; with several
  seeds, the mean ± sample standard deviation over seeds, the mean best validation loss, and a
  second table with every seed's final validation loss;
- ``ablation.json`` (everything: the settings, the rows as given and resolved, one entry per run with
  its curve and configurations, the per-row summaries), ``ablation.csv`` (one line per row),
  ``seeds.csv`` (one line per row and seed) and ``curves.csv`` (every logged step of every run);
  each run's folder is ``runs/seed<S>/<row>``.

An output folder that already holds an ablation is kept unless asked: ``--resume`` keeps its finished
runs (same settings required) and trains the missing ones, ``--overwrite`` starts afresh.
``tpa ablate --replot DIR`` redraws the plot and the table from ``DIR/ablation.json``;
``tpa ablate --replot DIR1 DIR2 ... --output MERGED`` merges ablations of the same settings that
hold different seeds or rows (e.g. one per device call) into one.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from pathlib import Path

from tpa.bench.ablate_report import FIELDS, plot_losses, table_markdown, write_outputs
from tpa.bench.ablate_results import (
    LABELS,
    ORDER,
    best_val_loss,
    merge,
    normalize,
    ordered_rows,
    recipe_differences,
    refresh,
    row_differences,
)
from tpa.utils.args import UsageError

__all__ = ["FIELDS", "LABELS", "ORDER", "parse_seeds", "plot_losses", "replot", "run", "table_markdown",
           "write_outputs"]
DEFAULT_OUTPUT = "runs/ablate"


def _run(args) -> int:
    from tpa.bench.runs import RunInterrupted

    try:
        if args.replot:
            replot(args.replot, output=args.output, plot=not args.no_plot, overwrite=args.overwrite)
        else:
            run(args)
    except RunInterrupted as err:
        print(f"error: interrupted: {err}; the finished runs are in the outputs (add them to with --resume)",
              file=sys.stderr)
        return 1
    return 0


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("the loss plot needs matplotlib: pip install 'tensor-product-attention[plot]' "
                         "(or pass --no-plot and redraw later with --replot)") from None


def parse_seeds(seeds: list[str] | None, seed: int | None) -> list[int]:
    """The seeds of ``--seeds`` (space- or comma-separated) or, without it, ``[--seed]`` (default ``[0]``).

    Raises:
        UsageError: both options, a value that is not an integer, a negative seed or one given twice.
    """
    if seeds is None:
        seeds = [str(0 if seed is None else seed)]
    elif seed is not None:
        raise UsageError("give --seed or --seeds, not both (--seeds 3 is the same as --seed 3)")
    out: list[int] = []
    for item in seeds:
        for name in (x for x in re.split(r"[,\s]+", str(item)) if x):
            if not re.fullmatch(r"[+-]?\d+", name):
                raise UsageError(f"--seeds: {name!r} is not an integer")
            value = int(name)
            if value < 0:
                raise UsageError(f"seeds must be >= 0, got {value}")
            if value in out:
                raise UsageError(f"--seeds lists seed {value} twice; give each seed once")
            out.append(value)
    if not out:
        raise UsageError("--seeds: no seed given")
    return out


def _read_record(folder: str | Path) -> dict:
    """The normalized record of ``folder/ablation.json``, or a UsageError that says what is wrong."""
    import json

    path = Path(folder) / "ablation.json"
    if not path.is_file():
        raise UsageError(f"{str(folder)!r}: no ablation.json there")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    return normalize(record, str(path))


def _run_entry(row: dict, seed: int, data_seed: int, run_: dict, seconds: float, meta: dict) -> dict:
    """One finished run as an entry of ``record["runs"]``."""
    from tpa import T6Config
    from tpa.bench.memory import model_parameters
    from tpa.bench.runs import final_val_loss, perplexity, throughput

    mc = T6Config.from_dict(run_["model_config"])
    records = run_["records"]
    val = final_val_loss(records)
    train_losses = [r["loss"] for r in records if r.get("loss") is not None]
    curve = [{k: r.get(k) for k in ("step", "tokens", "loss", "val_loss")} for r in records]
    return {
        "row": row["name"], "attention_type": row["attention_type"], "seed": seed, "data_seed": data_seed,
        "parameters": model_parameters(mc), "head_dim": mc.head_dim, "lr": row["lr"],
        "attention_params_per_layer": mc.attention_parameters_per_layer(), "heads": mc.num_attention_heads,
        "kv_elements_per_token": mc.kv_cache_elements_per_token() * mc.num_hidden_layers,
        "kv_bytes_per_token": 2 * mc.kv_cache_elements_per_token() * mc.num_hidden_layers,
        "final_val_loss": val, "val_perplexity": perplexity(val), "best_val_loss": best_val_loss(curve),
        "final_train_loss": train_losses[-1] if train_losses else None, "tokens": run_["result"]["tokens"],
        "tokens_per_s": throughput(records)["tokens_per_s"], "train_seconds": seconds,
        "device_name": meta["device_name"], "date": meta["date"],
        "curve": curve, "model_config": run_["model_config"], "train_config": run_["config"],
    }


def _recipe(args) -> dict:
    """The settings every row shares (checked), from the command line."""
    from tpa.models.presets import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    if args.data_seed < 0:
        raise UsageError(f"--data-seed must be >= 0, got {args.data_seed}")
    for name in ("batch_size", "seq_len", "eval_sequences"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    micro = args.micro_batch or args.batch_size
    if micro < 1 or args.batch_size % micro:
        raise UsageError(f"--micro-batch {micro} must be >= 1 and divide --batch-size {args.batch_size}")
    step_tokens = args.batch_size * args.seq_len
    if args.tokens is not None:
        if args.tokens < 1:
            raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
        steps = math.ceil(args.tokens / step_tokens)
    else:
        steps = 200 if args.steps is None else args.steps
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    return {
        "format": "tpa-ablation", "version": 3, "preset": args.preset, "data": args.data,
        "steps": steps, "batch_size": args.batch_size, "micro_batch": micro, "seq_len": args.seq_len,
        "tokens_per_type": steps * step_tokens, "lr": args.lr,
        "min_lr": args.lr / 10 if args.min_lr is None else args.min_lr,
        "warmup_steps": max(1, round(0.05 * steps)) if args.warmup_steps is None else args.warmup_steps,
        "eval_every": args.eval_every or max(1, steps // 10), "eval_sequences": args.eval_sequences,
        "data_seed": args.data_seed, "precision": args.precision, "compile": args.compile,
    }


def _rows(args) -> list[dict]:
    """The grid's rows, resolved at the preset: ``--types`` (all types without any row option), then
    the files of ``--rows``, then ``--row``."""
    from tpa.bench.ablate_grid import collect_rows, resolve_row
    from tpa.utils.args import parse_list
    from tpa.models.presets import ATTENTION_TYPES

    types = args.types if args.types is not None else (None if args.row or args.rows else ["all"])
    if types is not None:
        types = [t for t in ORDER if t in parse_list(types, ATTENTION_TYPES, "attention type")]
    rows = collect_rows(types, args.row, args.rows)
    return [resolve_row(name, spec, args.preset, lr=args.lr, min_lr=args.min_lr) for name, spec in rows]


def _continue_from(out: Path, record: dict, seeds: list[int]) -> None:
    """``--resume``: take the finished runs, rows and seeds of ``out/ablation.json`` into ``record``."""
    earlier = _read_record(out)
    diff = recipe_differences(earlier, record) + row_differences(earlier, record)
    if diff:
        raise UsageError(f"--resume: {out} holds an ablation with other settings ({'; '.join(diff)}, there vs "
                         "here); use its settings, or pass --overwrite or another --output")
    record["runs"] = earlier["runs"]
    record["row_specs"] = {**earlier["row_specs"], **record["row_specs"]}
    record["requested_rows"] = ordered_rows(earlier["requested_rows"] + record["requested_rows"],
                                            record["row_specs"])
    record["requested_seeds"] = sorted(set(earlier["requested_seeds"]) | set(seeds))
    record["seconds"] = earlier.get("seconds") or 0.0


def _train_values(args, record: dict, row: dict, seed: int, device) -> dict:
    """The TrainConfig values of one (row, seed) run."""
    return dict(preset=args.preset, attention_type=row["attention_type"], model_overrides=row["model_overrides"],
                data_dir=args.data, seq_len=args.seq_len, data_seed=args.data_seed + seed, seed=seed,
                global_batch_size=args.batch_size, micro_batch_size=record["micro_batch"], max_steps=record["steps"],
                lr=row["lr"], min_lr=row["min_lr"], warmup_steps=record["warmup_steps"],
                eval_every=record["eval_every"], eval_sequences=args.eval_sequences, log_every=1,
                checkpoint_every=record["steps"], keep_checkpoints=1, export=args.export, device=str(device),
                precision=args.precision, parallel="none", compile=args.compile)


def run(args) -> dict:
    """Train every (row, seed) run not already finished, then write plot, table and data; return the record."""
    from tpa.bench.runs import RunInterrupted, check_data_dir, training_run
    from tpa.utils.devices import resolve_device
    from tpa.utils.files import atomic_write_json
    from tpa.utils.runinfo import run_metadata

    record = _recipe(args)
    rows = _rows(args)
    seeds = parse_seeds(args.seeds, args.seed)
    meta = check_data_dir(args.data)
    if args.dry_run:
        from tpa.bench.ablate_grid import plan_markdown

        vocab = 64 * math.ceil(int(meta["vocab_size"]) / 64)  # as the trainer sizes the model
        print(plan_markdown(rows, args.preset, vocab_size=vocab, seq_len=args.seq_len,
                            tokens=record["tokens_per_type"], seeds=len(seeds)), end="")
        return record
    if not args.no_plot:
        _check_matplotlib()
    if not meta["splits"]["val"]["tokens"]:
        raise UsageError(f"--data {args.data!r} has no validation tokens; prepare it with --val-fraction > 0")
    out = Path(args.output or DEFAULT_OUTPUT)
    has_runs = (out / "runs").is_dir() and any((out / "runs").iterdir())
    if (has_runs or (out / "ablation.json").exists()) and not (args.resume or args.overwrite):
        raise UsageError(f"{out} already holds an ablation; pass --overwrite to replace it or --resume to keep "
                         "its finished runs and train the missing ones (or choose another --output)")
    device = resolve_device(args.device)
    record.update(data_fingerprint=meta.get("fingerprint"), requested_rows=[r["name"] for r in rows],
                  row_specs={r["name"]: r for r in rows}, requested_seeds=seeds, seconds=0.0,
                  run=run_metadata(device), runs=[])
    if args.overwrite and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    if args.resume and (out / "ablation.json").exists():
        _continue_from(out, record, seeds)
    refresh(record)
    done = {(r["row"], r["seed"]) for r in record["runs"]}
    previous_seconds = record["seconds"]
    start = time.perf_counter()
    interrupted = None
    for seed in seeds:  # seed-major: an interrupted ablation has whole seeds of every row
        for row in rows:
            name = row["name"]
            if (name, seed) in done:
                print(f"{name} seed {seed}: finished earlier, kept", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                run_ = training_run(_train_values(args, record, row, seed, device), out / "runs" / f"seed{seed}" / name)
            except RunInterrupted as err:
                interrupted = err
                break
            entry = _run_entry(row, seed, args.data_seed + seed, run_, time.perf_counter() - t0, record["run"])
            record["runs"].append(entry)
            refresh(record)
            record["seconds"] = previous_seconds + time.perf_counter() - start
            atomic_write_json(out / "ablation.json", record)  # after every run: an interrupted ablation keeps them
            print(f"{name} seed {seed}: val loss {entry['final_val_loss']}, {entry['tokens_per_s'] or 0:,.0f} "
                  f"tokens/s, {entry['train_seconds']:.1f} s", flush=True)
        if interrupted is not None:
            break
    record["seconds"] = previous_seconds + time.perf_counter() - start
    refresh(record)
    atomic_write_json(out / "ablation.json", record)
    print(f"wrote {out / 'ablation.json'}")
    if record["rows"]:
        write_outputs(record, out, plot=not args.no_plot)
    if interrupted is not None:
        raise interrupted
    return record


def replot(folders: str | list[str], *, output: str | None = None, plot: bool = True,
           overwrite: bool = False) -> list[Path]:
    """Redraw ``loss.png`` and rewrite the tables from ``folder/ablation.json``; with several folders
    (ablations of the same settings holding different seeds or rows), merge them into ``output``.

    Redrawing one folder in place leaves its ``ablation.json`` as it is; otherwise the (merged)
    ``ablation.json`` is written to ``output`` too, so that folder can be redrawn or resumed later.

    Raises:
        UsageError: no ablation.json, several folders without ``output``, records that cannot be merged,
            or an ``output`` that holds another ablation (without ``overwrite``).
    """
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    if len(folders) > 1 and output is None:
        raise UsageError("--replot with several folders merges them: give --output for the merged folder")
    if len(set(Path(f).resolve() for f in folders)) < len(folders):
        raise UsageError("--replot lists one folder twice")
    if plot:
        _check_matplotlib()
    records = [(str(f), _read_record(f)) for f in folders]
    record = records[0][1] if len(records) == 1 else merge(records)
    dest = Path(output) if output is not None else Path(folders[0])
    paths = []
    is_source = any(dest.resolve() == Path(f).resolve() for f in folders)
    if not is_source and (dest / "ablation.json").exists() and not overwrite:
        raise UsageError(f"{dest} already holds an ablation; pass --overwrite to replace it or choose another --output")
    try:
        if len(records) > 1 or not is_source:
            from tpa.utils.files import atomic_write_json

            paths.append(atomic_write_json(dest / "ablation.json", record))
            print(f"wrote {paths[-1]}")
        return paths + write_outputs(record, dest, plot=plot)
    except OSError as err:
        raise UsageError(f"cannot write to {dest} ({err}); give --output for a writable folder") from None
