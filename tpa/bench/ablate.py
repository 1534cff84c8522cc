"""``tpa ablate``: every attention type trained side by side, the paper's Figure 4 in miniature.

Each attention type (by default MHA, MQA, GQA, MLA, TPA-KVonly and TPA) is trained with the
project's training loop (:func:`tpa.train.trainer.train`) at one preset, whose head counts match the
attention parameters across types (the paper's Table 10 for its sizes, the same matching for
``tiny`` and ``mini``), on the same token shards, visiting the same sequences in the same order
(one ``data_seed``), from the same initialisation seed, for the same number of tokens, with the same
optimizer and schedule. Then it writes

- ``loss.png``: training and validation loss against tokens, one line per type;
- ``ablation.md``: final validation loss and perplexity, KV-cache bytes per token (all layers, bf16),
  parameters (whole model and attention per layer) and training tokens/s per type;
- ``ablation.json`` (everything, curves included), ``ablation.csv`` (the table) and ``curves.csv``
  (every logged step of every type); each type's run folder is under ``runs/``.

``tpa ablate --replot DIR`` redraws the plot and the table from ``DIR/ablation.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from tpa.eval.report import UsageError

ORDER = ("mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa")
LABELS = {"mha": "MHA", "mqa": "MQA", "gqa": "GQA", "mla": "MLA", "tpa_kvonly": "TPA-KVonly", "tpa": "TPA"}
FIELDS = ["attention_type", "parameters", "attention_params_per_layer", "heads", "kv_elements_per_token",
          "kv_bytes_per_token", "final_val_loss", "val_perplexity", "final_train_loss", "tokens", "tokens_per_s",
          "train_seconds"]


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="train every attention type side by side; loss plot and table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shakespeare", help="token shards from `tpa data prepare`")
    p.add_argument("--preset", default="tiny", help="model preset (tiny for a CPU, mini ~30-50M parameters, small)")
    p.add_argument("--types", nargs="+", default=["all"], help="attention types, or all")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per type (default 200)")
    budget.add_argument("--tokens", type=int, default=None, help="training tokens per type (rounded up to whole steps)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass (default: --batch-size)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr / 10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of the steps)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation losses (default: 10 per run)")
    p.add_argument("--eval-sequences", type=int, default=64, help="validation sequences per evaluation")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (the same for every type)")
    p.add_argument("--data-seed", type=int, default=0, help="data-order seed (the same for every type)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 autocast or fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--export", action="store_true", help="export each trained model (RUN/final) for tpa eval")
    p.add_argument("--no-plot", action="store_true", help="skip the plot (e.g. where matplotlib is missing)")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier ablation in --output")
    p.add_argument("--replot", metavar="DIR", default=None, help="only redraw plot and table from DIR/ablation.json")
    p.add_argument("--output", default="runs/ablate", help="output folder")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from tpa.bench.runs import RunInterrupted

    try:
        if args.replot:
            replot(args.replot, plot=not args.no_plot)
        else:
            run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"error: interrupted: {err}; the finished types are in the outputs", file=sys.stderr)
        return 1
    return 0


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("the loss plot needs matplotlib: pip install 'tensor-product-attention[plot]' "
                         "(or pass --no-plot and redraw later with --replot)") from None


def run(args) -> dict:
    """Train every type, then write plot, table and data; return the JSON record."""
    from tpa import T6Config
    from tpa.bench.memory import model_parameters
    from tpa.bench.runs import RunInterrupted, check_data_dir, final_val_loss, perplexity, throughput, training_run
    from tpa.eval.report import atomic_write_json, parse_list, resolve_device, run_metadata
    from tpa.models.t6.configuration_t6 import ATTENTION_TYPES, PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    types = parse_list(args.types, ATTENTION_TYPES, "attention type")
    types = [t for t in ORDER if t in types]
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
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    warmup = max(1, round(0.05 * steps)) if args.warmup_steps is None else args.warmup_steps
    eval_every = args.eval_every or max(1, steps // 10)
    if not args.no_plot:
        _check_matplotlib()
    meta = check_data_dir(args.data)
    if not meta["splits"]["val"]["tokens"]:
        raise UsageError(f"--data {args.data!r} has no validation tokens; prepare it with --val-fraction > 0")
    device = resolve_device(args.device)
    out = Path(args.output)
    if (out / "runs").exists() and any((out / "runs").iterdir()) and not args.overwrite:
        raise UsageError(f"{out} already holds ablation runs; pass --overwrite or choose another --output")

    record = {
        "preset": args.preset, "data": args.data, "types": [], "requested_types": types, "steps": steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens_per_type": steps * step_tokens, "lr": args.lr,
        "min_lr": min_lr, "warmup_steps": warmup, "eval_every": eval_every, "eval_sequences": args.eval_sequences,
        "seed": args.seed, "data_seed": args.data_seed, "precision": args.precision, "compile": args.compile,
        "parameter_spread": None, "complete": False, "seconds": None, "results": {},
        "run": run_metadata(device),
    }
    results = record["results"]
    start = time.perf_counter()
    interrupted = None
    for t in types:
        values = dict(preset=args.preset, attention_type=t, data_dir=args.data, seq_len=args.seq_len,
                      data_seed=args.data_seed, seed=args.seed, global_batch_size=args.batch_size,
                      micro_batch_size=micro, max_steps=steps, lr=args.lr, min_lr=min_lr, warmup_steps=warmup,
                      eval_every=eval_every, eval_sequences=args.eval_sequences, log_every=1,
                      checkpoint_every=steps, keep_checkpoints=1, export=args.export, device=str(device),
                      precision=args.precision, parallel="none", compile=args.compile)
        t0 = time.perf_counter()
        try:
            run_ = training_run(values, out / "runs" / t)
        except RunInterrupted as err:
            interrupted = err
            break
        seconds = time.perf_counter() - t0
        mc = T6Config.from_dict(run_["model_config"])
        records = run_["records"]
        val = final_val_loss(records)
        train_losses = [r["loss"] for r in records if r.get("loss") is not None]
        results[t] = {
            "attention_type": t, "parameters": model_parameters(mc),
            "attention_params_per_layer": mc.attention_parameters_per_layer(), "heads": mc.num_attention_heads,
            "kv_elements_per_token": mc.kv_cache_elements_per_token() * mc.num_hidden_layers,
            "kv_bytes_per_token": 2 * mc.kv_cache_elements_per_token() * mc.num_hidden_layers,
            "final_val_loss": val, "val_perplexity": perplexity(val),
            "final_train_loss": train_losses[-1] if train_losses else None, "tokens": run_["result"]["tokens"],
            "tokens_per_s": throughput(records)["tokens_per_s"], "train_seconds": seconds,
            "curve": [{k: r.get(k) for k in ("step", "tokens", "loss", "val_loss")} for r in records],
            "model_config": run_["model_config"], "train_config": run_["config"],
        }
        record["types"].append(t)
        params = [r["parameters"] for r in results.values()]
        record["parameter_spread"] = (max(params) - min(params)) / min(params)
        record["seconds"] = time.perf_counter() - start
        atomic_write_json(out / "ablation.json", record)  # after every type: an interrupted ablation keeps them
        print(f"{t}: val loss {val}, {results[t]['tokens_per_s'] or 0:,.0f} tokens/s, {seconds:.1f} s", flush=True)
    record["complete"] = interrupted is None
    record["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "ablation.json", record)
    print(f"wrote {out / 'ablation.json'}")
    if record["types"]:
        write_outputs(record, out, plot=not args.no_plot)
    if interrupted is not None:
        raise interrupted
    return record


def table_markdown(record: dict) -> str:
    from tpa.eval.report import fmt_bytes, fmt_float, fmt_int, markdown_table

    rows = []
    for t in record["types"]:
        r = record["results"][t]
        rows.append([LABELS.get(t, t), fmt_int(r["parameters"]), fmt_int(r["attention_params_per_layer"]), r["heads"],
                     f"{fmt_int(r['kv_bytes_per_token'])} B ({fmt_bytes(r['kv_bytes_per_token'])})",
                     fmt_float(r["final_val_loss"], 4), fmt_float(r["val_perplexity"], 2),
                     fmt_int(round(r["tokens_per_s"])) if r.get("tokens_per_s") else ""])
    run = record["run"]
    head = ("" if record.get("complete", True) else "Incomplete (interrupted): ") + (
        f"Ablation: preset {record['preset']}, {fmt_int(record['tokens_per_type'])} training tokens per type "
        f"({record['steps']} steps x {record['batch_size']} x {record['seq_len']}), lr {record['lr']:g} -> "
        f"{record['min_lr']:g}, data {record['data']}; {run['device_name']}, {run['date']}. Parameter counts "
        f"differ by at most {100 * (record['parameter_spread'] or 0):.2f}%.\n\n")
    return head + markdown_table(
        ["attention", "params", "attn. params / layer", "heads", "KV cache / token (bf16, all layers)",
         "final val loss", "val perplexity", "train tokens/s"], rows, align="lrrrrrrr")


def plot_losses(record: dict, path: Path) -> Path:
    """Training loss (left) and validation loss (right) against tokens, one line per type; saved atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tpa.eval.report import atomic_write_bytes

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for t in record["types"]:
        curve = record["results"][t]["curve"]
        train = [(c["tokens"], c["loss"]) for c in curve if c.get("loss") is not None]
        val = [(c["tokens"], c["val_loss"]) for c in curve if c.get("val_loss") is not None]
        label = LABELS.get(t, t)
        if train:
            ax_train.plot(*zip(*train), label=label, linewidth=1.0)
        if val:
            ax_val.plot(*zip(*val), label=label, marker="o", markersize=3, linewidth=1.2)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"T6 {record['preset']}: attention types at matched parameters ({record['run']['device_name']})",
                 fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(record: dict, out: Path, *, plot: bool = True) -> list[Path]:
    """Write ``ablation.md``, ``ablation.csv``, ``curves.csv`` and (unless disabled) ``loss.png``."""
    from tpa.eval.report import atomic_write_csv, atomic_write_text, print_written

    text = table_markdown(record)
    rows = [{k: record["results"][t].get(k) for k in FIELDS} for t in record["types"]]
    curves = [{"attention_type": t, **c} for t in record["types"] for c in record["results"][t]["curve"]]
    paths = [atomic_write_text(out / "ablation.md", text), atomic_write_csv(out / "ablation.csv", rows, FIELDS),
             atomic_write_csv(out / "curves.csv", curves, ["attention_type", "step", "tokens", "loss", "val_loss"])]
    if plot:
        paths.append(plot_losses(record, out / "loss.png"))
    print(text, end="")
    print_written(paths)
    return paths


def replot(folder: str, *, plot: bool = True) -> list[Path]:
    """Redraw ``loss.png`` and rewrite the tables from ``folder/ablation.json``."""
    import json

    path = Path(folder) / "ablation.json"
    if not path.is_file():
        raise UsageError(f"--replot {folder!r}: no ablation.json there")
    if plot:
        _check_matplotlib()
    record = json.loads(path.read_text())
    return write_outputs(record, Path(folder), plot=plot)
