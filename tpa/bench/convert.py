"""``tpa bench convert``: what converting a trained MHA model to TPA costs, and what distillation buys back.

With the project's training loop (:func:`tpa.train.trainer.train`) on one corpus and one recipe:

(a) the teacher: an MHA model of ``--preset`` trained for ``--teacher-steps``;
(b) for each rank R in ``--ranks``: the teacher converted to TPA-KVonly at ``R_k = R_v = R``
    (``tpa convert llama``, calibration on the training data) and distilled from the teacher
    (``tpa train --init-from --distill-from``) for ``--distill-fraction`` of the teacher's steps;
    its validation loss before distillation is the distillation run's step-0 evaluation;
(c) a TPA-KVonly model of the same architecture (heads, ranks) trained from scratch for the
    distillation's steps, and (d) for the teacher's steps.

Every run uses the same batch, sequence length, validation sequences and a cosine schedule with 5%
warm-up. It writes ``convert.md`` (table), ``convert.json`` (settings, every result, run metadata),
``convert.png`` (KV-cache elements per token and layer against validation loss) and the runs under
``runs/``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tpa.utils.args import UsageError

DEFAULT_OUTPUT = "runs/bench-convert"


def _run(args) -> int:
    from tpa.utils.args import parse_ints

    try:
        record = run(args.data, Path(args.output), preset=args.preset, ranks=parse_ints(args.ranks, "rank"),
                     teacher_steps=args.teacher_steps, distill_fraction=args.distill_fraction,
                     batch_size=args.batch_size, micro_batch=args.micro_batch or args.batch_size,
                     seq_len=args.seq_len, lr=args.lr, distill_lr=args.distill_lr, distill_weight=args.distill_weight,
                     distill_temperature=args.distill_temperature, calibration_tokens=args.calibration_tokens,
                     eval_sequences=args.eval_sequences, device=args.device, precision=args.precision,
                     plot=not args.no_plot, overwrite=args.overwrite, argv=sys.argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if record else 1


def _recipe(steps: int, lr: float, common: dict) -> dict:
    return {**common, "max_steps": steps, "lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 20),
            "eval_every": max(1, steps // 4), "log_every": max(1, steps // 20), "checkpoint_every": steps}


def _result(name: str, rank: int | None, run: dict, cache: int, val_loss: float) -> dict:
    return {"model": name, "rank": rank, "kv_elements_per_token_per_layer": cache, "val_loss": val_loss,
            "train_tokens": run["result"]["tokens"], "steps": run["result"]["step"]}


def run(data: str, out: Path, *, preset: str, ranks: list[int], teacher_steps: int, distill_fraction: float,
        batch_size: int, micro_batch: int, seq_len: int, lr: float, distill_lr: float, distill_weight: float,
        distill_temperature: float, calibration_tokens: int, eval_sequences: int, device: str, precision: str,
        plot: bool, overwrite: bool, argv) -> dict:
    """Run the benchmark of the module docstring into ``out``; return its record."""
    from tpa.bench.runs import check_data_dir, final_val_loss, training_run
    from tpa.convert.common import ConversionError
    from tpa.convert.llama import ConvertOptions, convert
    from tpa.utils.devices import resolve_device
    from tpa.utils.files import atomic_write_json, atomic_write_text, print_written
    from tpa.utils.runinfo import run_metadata

    check_data_dir(data)
    if teacher_steps < 1 or not 0 < distill_fraction <= 1:
        raise UsageError("need --teacher-steps >= 1 and 0 < --distill-fraction <= 1")
    if (out / "convert.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a result: pass --overwrite to replace it, or choose another --output")
    shutil.rmtree(out / "runs", ignore_errors=True)
    distill_steps = max(1, round(distill_fraction * teacher_steps))
    common = dict(preset=preset, data_dir=data, seq_len=seq_len, global_batch_size=batch_size,
                  micro_batch_size=micro_batch, eval_sequences=eval_sequences, device=device, precision=precision)
    teacher = training_run({**_recipe(teacher_steps, lr, common), "attention_type": "mha"}, out / "runs" / "teacher")
    teacher_dir = Path(teacher["result"]["export_dir"])
    heads = teacher["model_config"]["num_attention_heads"]
    head_dim = teacher["model_config"]["head_dim"]
    results = [_result("teacher (MHA)", None, teacher, 2 * heads * head_dim, teacher["result"]["val_loss"])]
    conversions = {}
    for rank in ranks:
        try:
            report = convert(teacher_dir, out / "runs" / f"r{rank}" / "converted",
                             ConvertOptions(k_rank=rank, v_rank=rank, calibration=data,
                                            calibration_tokens=calibration_tokens, calibration_seq_len=seq_len))
        except ConversionError as err:
            raise UsageError(f"--ranks {rank}: {err}") from None
        conversions[rank] = report
        cache = report["kv_cache_per_token_per_layer"]["converted"]
        distilled = training_run({**_recipe(distill_steps, distill_lr, common),
                                  "init_from": str(out / "runs" / f"r{rank}" / "converted"),
                                  "distill_from": str(teacher_dir), "distill_weight": distill_weight,
                                  "distill_temperature": distill_temperature}, out / "runs" / f"r{rank}" / "distilled")
        before = next(r["val_loss"] for r in distilled["records"] if r["step"] == 0 and r.get("val_loss") is not None)
        results.append({**_result("converted", rank, distilled, cache, before), "train_tokens": 0, "steps": 0})
        results.append(_result("converted + distilled", rank, distilled, cache, final_val_loss(distilled["records"])))
        arch = {"attention_type": "tpa_kvonly",
                "model_overrides": {"num_attention_heads": heads, "head_dim": head_dim, "k_rank": rank, "v_rank": rank}}
        for name, steps in (("TPA-KVonly from scratch, distillation's tokens", distill_steps),
                            ("TPA-KVonly from scratch, teacher's tokens", teacher_steps)):
            scratch = training_run({**_recipe(steps, lr, common), **arch},
                                   out / "runs" / f"r{rank}" / f"scratch_{steps}")
            results.append(_result(name, rank, scratch, scratch_cache(scratch), scratch["result"]["val_loss"]))
    record = {"settings": dict(data=data, preset=preset, ranks=ranks, teacher_steps=teacher_steps,
                               distill_steps=distill_steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                               distill_lr=distill_lr, distill_weight=distill_weight,
                               distill_temperature=distill_temperature, calibration_tokens=calibration_tokens,
                               eval_sequences=eval_sequences),
              "run": run_metadata(resolve_device(device), argv), "results": results,
              "conversions": {str(k): v for k, v in conversions.items()}}
    text = table_markdown(record)
    paths = [atomic_write_json(out / "convert.json", record), atomic_write_text(out / "convert.md", text)]
    if plot:
        paths.append(plot_tradeoff(record, out / "convert.png"))
    print(text, end="")
    print_written(paths)
    return record


def scratch_cache(run: dict) -> int:
    from tpa import T6Config

    return T6Config.from_dict(dict(run["model_config"])).kv_cache_elements_per_token()


def table_markdown(record: dict) -> str:
    from tpa.utils.tables import fmt_float, fmt_int, markdown_table

    s = record["settings"]
    teacher = record["results"][0]
    rows = []
    for r in record["results"]:
        rel = (r["val_loss"] / teacher["val_loss"] - 1) if r["val_loss"] is not None else None
        rows.append([r["model"], r["rank"] if r["rank"] is not None else "-", fmt_int(r["kv_elements_per_token_per_layer"]),
                     f"{r['kv_elements_per_token_per_layer'] / teacher['kv_elements_per_token_per_layer']:.1%}",
                     fmt_int(r["train_tokens"]), fmt_float(r["val_loss"], 4),
                     "-" if rel is None else f"{rel:+.2%}"])
    head = (f"T6 {s['preset']} on {s['data']}: teacher {s['teacher_steps']} steps, distillation "
            f"{s['distill_steps']} steps (W={s['distill_weight']}, T={s['distill_temperature']}, lr {s['distill_lr']}), "
            f"batch {s['batch_size']} x {s['seq_len']} tokens; {record['run'].get('device_name')}, {record['run'].get('date')}\n\n")
    return head + markdown_table(["model", "R_k = R_v", "KV elements / token / layer", "of teacher's",
                                  "training tokens", "val loss", "vs teacher"], rows, align="lrrrrrr") + "\n"


def plot_tradeoff(record: dict, path: Path) -> Path:
    """KV-cache elements per token and layer (x) against validation loss (y), one marker style per kind."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tpa.utils.files import atomic_write_bytes

    styles = {"teacher (MHA)": ("*", 14), "converted": ("x", 9), "converted + distilled": ("o", 8),
              "TPA-KVonly from scratch, distillation's tokens": ("v", 8),
              "TPA-KVonly from scratch, teacher's tokens": ("s", 8)}
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name, (marker, size) in styles.items():
        points = [r for r in record["results"] if r["model"] == name and r["val_loss"] is not None]
        if points:
            ax.plot([r["kv_elements_per_token_per_layer"] for r in points], [r["val_loss"] for r in points],
                    linestyle="none", marker=marker, markersize=size, label=name)
            for r in points:
                if r["rank"] is not None:
                    ax.annotate(f"R={r['rank']}", (r["kv_elements_per_token_per_layer"], r["val_loss"]),
                                textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xlabel("KV-cache elements per token per layer")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s = record["settings"]
    ax.set_title(f"MHA -> TPA-KVonly, T6 {s['preset']} ({record['run'].get('device_name')})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
