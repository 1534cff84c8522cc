"""The outputs of ``tpa ablate``: markdown table, loss plot and CSV files, from a normalized record.

With one seed the table and the plot are those the ablation has always written (one value per row,
one line per row). With several seeds the table shows, per row, the number of seeds, the final
validation loss as mean ± sample standard deviation, the perplexity of the mean loss, the mean best
validation loss and the mean training tokens/s, followed by a table of the final validation loss of
every seed; the plot draws the mean curve of each row with a shaded band from the lowest to the
highest value over the seeds. Rows that are plain attention types are named MHA, TPA, ...; a grid
of other rows names them by their row names, adds a column with each row's learning rate where the
rows differ in it, and lists what each row trains (settings, heads, how the heads were chosen)
below the tables.

Files: ``ablation.md``, ``ablation.csv`` (one line per row, the summary), ``seeds.csv`` (one line per
row and seed), ``curves.csv`` (every logged step of every run) and ``loss.png``.
"""

from __future__ import annotations

from pathlib import Path

from tpa.bench.ablate_results import is_grid, row_label

# ablation.csv: one line per row (the first twelve columns are those of the one-seed ablation)
FIELDS = ["attention_type", "parameters", "attention_params_per_layer", "heads", "kv_elements_per_token",
          "kv_bytes_per_token", "final_val_loss", "val_perplexity", "final_train_loss", "tokens", "tokens_per_s",
          "train_seconds", "n_seeds", "seeds", "final_val_loss_std", "final_val_loss_min", "final_val_loss_max",
          "best_val_loss", "best_val_loss_std", "row", "lr", "min_lr"]
# seeds.csv: one line per row and seed
SEED_FIELDS = ["attention_type", "seed", "data_seed", "parameters", "attention_params_per_layer", "heads",
               "kv_bytes_per_token", "final_val_loss", "val_perplexity", "best_val_loss", "final_train_loss",
               "tokens", "tokens_per_s", "train_seconds", "device_name", "date", "row", "lr"]
CURVE_FIELDS = ["attention_type", "seed", "step", "tokens", "loss", "val_loss", "row"]


def _distinct(values) -> str:
    return " + ".join(dict.fromkeys(str(v) for v in values if v))


def _loss_with_std(mean: float | None, std: float | None) -> str:
    from tpa.utils.tables import fmt_float

    return fmt_float(mean, 4) if std is None else f"{fmt_float(mean, 4)} ± {fmt_float(std, 4)}"


def _varies_lr(record: dict) -> bool:
    return len({(record["row_specs"].get(n, {}).get("lr"), record["row_specs"].get(n, {}).get("min_lr"))
                for n in record["rows"]}) > 1


def rows_markdown(record: dict) -> str:
    """What each row of a grid trains: one bullet per row."""
    from tpa.bench.ablate_grid import describe

    lines = [f"- `{n}`: {describe(record['row_specs'][n], record['lr'])}" for n in record["rows"]
             if n in record["row_specs"]]
    return "\nRows (heads matched to MHA's attention parameters as the presets do, unless fixed):\n\n" + \
        "\n".join(lines) + "\n"


def table_markdown(record: dict) -> str:
    """The ablation table (and, with several seeds, the per-seed table) with a line of context; for a
    grid of rows, the list of what each row trains."""
    from tpa.utils.tables import fmt_bytes, fmt_float, fmt_int, markdown_table

    multi = len(record["seeds"]) > 1
    grid = is_grid(record)
    lr_column = grid and _varies_lr(record)
    rows = []
    for n in record["rows"]:
        r = record["results"][n]
        row = [row_label(record, n), fmt_int(r["parameters"]), fmt_int(r["attention_params_per_layer"]), r["heads"],
               f"{fmt_int(r['kv_bytes_per_token'])} B ({fmt_bytes(r['kv_bytes_per_token'])})"]
        if lr_column:
            row.append(f"{record['row_specs'][n]['lr']:g}")
        tokens_per_s = fmt_int(round(r["tokens_per_s"])) if r.get("tokens_per_s") else ""
        if multi:
            row += [r["n_seeds"], _loss_with_std(r["final_val_loss"], r["final_val_loss_std"]),
                    fmt_float(r["val_perplexity"], 2), _loss_with_std(r["best_val_loss"], None), tokens_per_s]
        else:
            row += [fmt_float(r["final_val_loss"], 4), fmt_float(r["val_perplexity"], 2), tokens_per_s]
        rows.append(row)
    runs = record["runs"]
    devices = _distinct(r.get("device_name") for r in runs) or record["run"]["device_name"]
    dates = _distinct(r.get("date") for r in runs) or record["run"]["date"]
    missing = ", ".join(f"{t} seed {s}" for t, s in record.get("missing", []))
    head = "" if record.get("complete", True) else f"Incomplete (missing runs: {missing}): "
    unit = "row" if grid else "type"
    per = f"per {unit} and seed" if multi else f"per {unit}"
    lr = f"lr {record['lr']:g} -> {record['min_lr']:g}" if not lr_column else "lr per row (column lr; cosine to the row's min_lr)"
    head += (f"Ablation: preset {record['preset']}, {fmt_int(record['tokens_per_type'])} training tokens {per} "
             f"({record['steps']} steps x {record['batch_size']} x {record['seq_len']}), {lr}, data {record['data']}; "
             f"{devices}, {dates}.")
    if multi:
        seeds = ", ".join(map(str, record["seeds"]))
        head += (f" Seeds {seeds}: seed s initialises the model with s and orders the training data with "
                 f"data seed {record['data_seed']} + s. Losses are means over the seeds ± their sample standard "
                 "deviation; perplexity is exp(mean final loss); tokens/s is the mean.")
    head += f" Parameter counts differ by at most {100 * (record['parameter_spread'] or 0):.2f}%.\n\n"
    columns = ["row" if grid else "attention", "params", "attn. params / layer", "heads",
               "KV cache / token (bf16, all layers)"] + (["lr"] if lr_column else [])
    tail = rows_markdown(record) if grid else ""
    if not multi:
        columns += ["final val loss", "val perplexity", "train tokens/s"]
        return head + markdown_table(columns, rows, align="l" + "r" * (len(columns) - 1)) + tail
    columns += ["seeds", "final val loss (mean ± std)", "val perplexity (of mean)", "best val loss (mean)",
                "train tokens/s (mean)"]
    table = markdown_table(columns, rows, align="l" + "r" * (len(columns) - 1))
    by_run = {(r["row"], r["seed"]): r for r in runs}
    seed_rows = [[row_label(record, n)] + [fmt_float(by_run[(n, s)].get("final_val_loss"), 4) if (n, s) in by_run
                                           else "" for s in record["seeds"]] for n in record["rows"]]
    per_seed = markdown_table(["final val loss"] + [f"seed {s}" for s in record["seeds"]], seed_rows,
                              align="l" + "r" * len(record["seeds"]))
    return head + table + "\n" + per_seed + tail


def plot_losses(record: dict, path: Path) -> Path:
    """Training loss (left) and validation loss (right) against tokens, one line per row (the mean
    over seeds, with a min-max band when there are several); saved atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tpa.utils.files import atomic_write_bytes

    multi = len(record["seeds"]) > 1
    names = record["rows"]
    legend_rows = -(-len(names) // min(len(names), 4))
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.22 * legend_rows), constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    tails = {ax_train: [], ax_val: []}
    for i, n in enumerate(names):
        summary = record["results"][n]
        seeds = summary["n_seeds"]
        label = row_label(record, n) + (f" ({seeds} seed{'s' if seeds != 1 else ''})" if multi else "")
        for ax, key, style in ((ax_train, "loss", dict(linewidth=1.0)),
                               (ax_val, "val_loss", dict(marker="o", markersize=3, linewidth=1.2))):
            points = [c for c in summary["curve"] if c.get(key) is not None]
            if not points:
                continue
            x = [c["tokens"] for c in points]
            y = [c[key] for c in points]
            ax.plot(x, y, label=label, color=colors[i % len(colors)], **style)
            tails[ax] += [v for t, v in zip(x, y) if t >= 0.2 * x[-1]]
            if seeds > 1:
                ax.fill_between(x, [c[f"{key}_min"] for c in points], [c[f"{key}_max"] for c in points],
                                color=colors[i % len(colors)], alpha=0.18, linewidth=0)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.set_title(title + (" (mean over seeds, band: min-max)" if multi else ""))
        ax.grid(alpha=0.3)
        if tails[ax]:  # the last 80% of training, where the rows differ; the first steps' drop is cut
            low, high = min(tails[ax]), max(tails[ax])
            ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.25 * (high - low + 1e-9))
    handles, labels = ax_val.get_legend_handles_labels() or ax_train.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    devices = _distinct(r.get("device_name") for r in record["runs"]) or record["run"]["device_name"]
    what = "ablation rows" if is_grid(record) else "attention types at matched parameters"
    fig.suptitle(f"T6 {record['preset']}: {what} ({devices})", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(record: dict, out: Path, *, plot: bool = True) -> list[Path]:
    """Write ``ablation.md``, ``ablation.csv``, ``seeds.csv``, ``curves.csv`` and (unless disabled)
    ``loss.png`` into ``out``; print the table and the paths."""
    from tpa.utils.files import atomic_write_csv, atomic_write_text, print_written

    text = table_markdown(record)
    specs = record["row_specs"]
    summary = [{**record["results"][n], "seeds": " ".join(map(str, record["results"][n]["seeds"])),
                "lr": specs.get(n, {}).get("lr"), "min_lr": specs.get(n, {}).get("min_lr")} for n in record["rows"]]
    runs = sorted(record["runs"], key=lambda r: (record["rows"].index(r["row"]), r["seed"]))
    runs = [{**r, "lr": r.get("lr", specs.get(r["row"], {}).get("lr"))} for r in runs]
    curves = [{"attention_type": r["attention_type"], "seed": r["seed"], **c, "row": r["row"]} for r in runs
              for c in r["curve"]]
    paths = [atomic_write_text(out / "ablation.md", text), atomic_write_csv(out / "ablation.csv", summary, FIELDS),
             atomic_write_csv(out / "seeds.csv", runs, SEED_FIELDS),
             atomic_write_csv(out / "curves.csv", curves, CURVE_FIELDS)]
    if plot:
        paths.append(plot_losses(record, out / "loss.png"))
    print(text, end="")
    print_written(paths)
    return paths
