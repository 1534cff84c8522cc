"""The data of ``tpa ablate``: one entry per finished run, per-row summaries over seeds, merging.

An ablation record (``ablation.json``, format ``tpa-ablation`` version 3) holds the settings shared by
every run (the *recipe*: preset, data, budget, optimizer, evaluation), the grid's rows
(``requested_rows`` in order, and ``row_specs``: per row name its settings as given and as resolved
by :func:`tpa.bench.ablate_grid.resolve_row`), the list ``runs`` with one entry per finished
(row, seed) run (its numbers, loss curve, model and training configuration, device and date), and
``results``: per row, the summary over its seeds that the table and the plot show. ``results`` is
derived from ``runs`` and recomputed whenever a record is read, merged or extended. The rows of
``--types`` are named by their attention type.

Seeds: the run of seed ``s`` initialises the model with seed ``s`` and visits the training windows
in the order of data seed ``data_seed + s``, so seeds vary both sources of run-to-run noise, and a
seed's run is the same whichever other seeds it is run or merged with. With the default single seed
0 this is the one run the ablation made before seeds existed.

Records written before version 3 (one row per attention type) and before version 2 (one seed,
per-type entries in ``results`` and no ``runs``) are read through :func:`normalize`.
"""

from __future__ import annotations

import statistics

from tpa.bench.runs import perplexity
from tpa.utils.args import UsageError

FORMAT = "tpa-ablation"
VERSION = 3
ORDER = ("mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa")
LABELS = {"mha": "MHA", "mqa": "MQA", "gqa": "GQA", "mla": "MLA", "tpa_kvonly": "TPA-KVonly", "tpa": "TPA"}
# settings that must agree for runs to be compared (resumed into one folder, or merged)
RECIPE = ("preset", "data", "steps", "batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "eval_every",
          "eval_sequences", "data_seed", "precision", "compile")
# per-run numbers that are a property of the row, not of the seed
STRUCTURE = ("parameters", "attention_params_per_layer", "heads", "kv_elements_per_token", "kv_bytes_per_token")


def plain_row(t: str, record: dict) -> dict:
    """The row spec of attention type ``t`` at the preset (a row of ``--types``), for older records."""
    return {"name": t, "spec": {"attention_type": t}, "attention_type": t, "model_overrides": {},
            "lr": record.get("lr"), "min_lr": record.get("min_lr"), "match": "heads"}


def is_plain(row: dict) -> bool:
    """A row that is just its attention type at the preset (the rows of ``--types``)."""
    return row["spec"] == {"attention_type": row["name"]}


def row_label(record: dict, name: str) -> str:
    """The table's name of a row: MHA, TPA, ... for the rows of ``--types``, else the row's name."""
    row = record.get("row_specs", {}).get(name)
    return LABELS.get(name, name) if row is None or is_plain(row) else name


def is_grid(record: dict) -> bool:
    """Whether the record has rows other than plain attention types (its table describes the rows)."""
    return not all(is_plain(record["row_specs"][n]) for n in record["rows"] if n in record["row_specs"])


def same_row(a: dict, b: dict) -> bool:
    """Two row specs train the same model the same way (settings as given, learning rates)."""
    return all(a.get(k) == b.get(k) for k in ("spec", "lr", "min_lr"))


def ordered_rows(names, row_specs: dict) -> list[str]:
    """Row names without repeats: plain attention-type rows only: in ORDER; otherwise as given."""
    names = list(dict.fromkeys(names))
    if all(is_plain(row_specs[n]) for n in names if n in row_specs):
        return ordered_types(names)
    return names


def ordered_types(types) -> list[str]:
    """``types`` in the table's order (known types first, in ORDER; others after, as given)."""
    types = list(dict.fromkeys(types))
    return [t for t in ORDER if t in types] + [t for t in types if t not in ORDER]


def best_val_loss(curve: list[dict]) -> float | None:
    """The lowest validation loss of a run's curve (None when it has none)."""
    vals = [c["val_loss"] for c in curve if isinstance(c.get("val_loss"), (int, float))]
    return min(vals) if vals else None


def _numbers(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def mean(values) -> float | None:
    """Mean of the numbers among ``values`` (None when there are none)."""
    xs = _numbers(values)
    return statistics.fmean(xs) if xs else None


def std(values) -> float | None:
    """Sample standard deviation (n - 1) of the numbers among ``values``; None for fewer than two."""
    xs = _numbers(values)
    return statistics.stdev(xs) if len(xs) > 1 else None


# --------------------------------------------------------------------------------------------------
# Reading records


def normalize(record: dict, where: str = "ablation.json") -> dict:
    """A version-2 record (with ``runs``) from ``record``; version-1 records gain their one-seed rows.

    Raises:
        UsageError: not an ablation record.
    """
    if not isinstance(record, dict) or "results" not in record or "preset" not in record:
        raise UsageError(f"{where} is not an ablation record (no preset and results)")
    record = dict(record)
    if "runs" not in record:  # version 1: one seed, the rows are the per-type results
        seed = record.get("seed", 0)
        run = record.get("run", {})
        rows = []
        for t in record.get("types", []):
            r = dict(record["results"][t])
            r.update(seed=seed, data_seed=r.get("train_config", {}).get("data_seed", record.get("data_seed", 0)),
                     best_val_loss=best_val_loss(r.get("curve", [])), device_name=run.get("device_name"),
                     date=run.get("date"))
            rows.append(r)
        record["runs"] = rows
        record["data_seed"] = record.get("data_seed", 0)
        record["requested_seeds"] = [seed]
    record.setdefault("requested_seeds", sorted({r["seed"] for r in record["runs"]}))
    if "requested_rows" not in record:  # version 2: one row per attention type, named by it
        record["requested_rows"] = ordered_types(record.get("requested_types", record.get("types", [])))
        record["runs"] = [{**r, "row": r["attention_type"]} for r in record["runs"]]
        record["row_specs"] = {t: plain_row(t, record) for t in record["requested_rows"]}
        record.pop("requested_types", None)
        record.pop("types", None)
    record.setdefault("data_fingerprint", None)
    record["format"], record["version"] = FORMAT, VERSION
    return refresh(record)


def refresh(record: dict) -> dict:
    """Recompute the derived fields from ``record["runs"]``, in place; returns ``record``.

    ``rows`` and ``seeds`` are those with a finished run (rows in the requested order), ``results``
    the per-row summaries, ``missing`` the requested (row, seed) pairs without a finished run, and
    ``complete`` says there are none.
    """
    runs = record["runs"]
    seen = set()
    for r in runs:
        key = (r["row"], r["seed"])
        if key in seen:
            raise UsageError(f"{r['row']} seed {r['seed']} appears twice in the runs")
        seen.add(key)
    finished = {r["row"] for r in runs}
    requested = record["requested_rows"]
    record["rows"] = [n for n in requested if n in finished] + [n for n in dict.fromkeys(r["row"] for r in runs)
                                                               if n not in requested]
    record["seeds"] = sorted({r["seed"] for r in runs})
    record["results"] = {n: summarise([r for r in runs if r["row"] == n]) for n in record["rows"]}
    params = [s["parameters"] for s in record["results"].values()]
    record["parameter_spread"] = (max(params) - min(params)) / min(params) if params else None
    record["missing"] = [[n, s] for s in record["requested_seeds"] for n in requested if (n, s) not in seen]
    record["complete"] = not record["missing"]
    return record


def summarise(runs: list[dict]) -> dict:
    """One row's summary over its seeds' runs (all of the same row).

    ``final_val_loss``, ``best_val_loss``, ``final_train_loss``, ``tokens_per_s`` and ``train_seconds``
    are means over the seeds; ``*_std`` the sample standard deviation (None with one seed);
    ``val_perplexity`` is exp of the mean final loss; ``final_val_losses`` lists the per-seed values in
    the order of ``seeds``; ``curve`` is the mean curve with the min and max over seeds at each step.

    Raises:
        UsageError: the runs disagree on parameter counts or cache size (not one configuration).
    """
    runs = sorted(runs, key=lambda r: r["seed"])
    t = runs[0]["row"]
    for key in STRUCTURE:
        values = {r.get(key) for r in runs}
        if len(values) > 1:
            raise UsageError(f"the {t} runs of seeds {[r['seed'] for r in runs]} differ in {key} "
                             f"({sorted(values, key=str)}): not the same model configuration")
    finals = [r.get("final_val_loss") for r in runs]
    bests = [r.get("best_val_loss") for r in runs]
    final = mean(finals)
    losses = _numbers(finals)
    return {
        "row": t, "attention_type": runs[0]["attention_type"], **{k: runs[0].get(k) for k in STRUCTURE},
        "seeds": [r["seed"] for r in runs], "n_seeds": len(runs),
        "final_val_loss": final, "final_val_loss_std": std(finals),
        "final_val_loss_min": min(losses) if losses else None, "final_val_loss_max": max(losses) if losses else None,
        "final_val_losses": finals, "val_perplexity": perplexity(final),
        "best_val_loss": mean(bests), "best_val_loss_std": std(bests),
        "final_train_loss": mean(r.get("final_train_loss") for r in runs), "tokens": runs[0].get("tokens"),
        "tokens_per_s": mean(r.get("tokens_per_s") for r in runs),
        "train_seconds": mean(r.get("train_seconds") for r in runs),
        "curve": mean_curve([r.get("curve", []) for r in runs]),
    }


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Per logged step present in every curve: tokens, and mean/min/max of ``loss`` and ``val_loss``."""
    by_step = [{c["step"]: c for c in curve} for curve in curves]
    out = []
    for step in [c["step"] for c in curves[0]] if curves else []:
        if not all(step in steps for steps in by_step):
            continue
        points = [steps[step] for steps in by_step]
        row = {"step": step, "tokens": points[0].get("tokens")}
        for key in ("loss", "val_loss"):
            xs = _numbers(p.get(key) for p in points)
            row[key] = statistics.fmean(xs) if xs else None
            row[f"{key}_min"] = min(xs) if xs else None
            row[f"{key}_max"] = max(xs) if xs else None
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# Comparing and merging


def recipe_differences(a: dict, b: dict) -> list[str]:
    """The recipe settings in which records ``a`` and ``b`` differ, as ``"name a vs b"`` strings.

    Data folders compare by their fingerprint where both records have one, else by path.
    """
    keys = list(RECIPE)
    if a.get("data_fingerprint") and b.get("data_fingerprint"):
        keys[keys.index("data")] = "data_fingerprint"
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def row_differences(a: dict, b: dict) -> list[str]:
    """The rows that records ``a`` and ``b`` both name but define differently."""
    return [f"row {n}: {a['row_specs'][n]['spec']} vs {b['row_specs'][n]['spec']}" for n in a["row_specs"]
            if n in b["row_specs"] and not same_row(a["row_specs"][n], b["row_specs"][n])]


def merge(records: list[tuple[str, dict]]) -> dict:
    """One record from several ``(name, record)`` pairs of the same recipe (e.g. the same ablation
    split over device calls by rows or ``--seeds``).

    The first record's settings and run metadata are kept; ``runs``, the rows and the requested seeds
    are the unions; ``seconds`` is the sum; ``sources`` names each input with its metadata.

    Raises:
        UsageError: different recipes, one row name defined two ways, or one (row, seed) run in two records.
    """
    if not records:
        raise UsageError("nothing to merge")
    records = [(name, normalize(rec, name)) for name, rec in records]
    first_name, first = records[0]
    merged = {k: v for k, v in first.items() if k not in ("runs", "results", "sources")}
    merged["runs"], merged["sources"], merged["row_specs"] = [], [], {}
    owner: dict[tuple[str, int], str] = {}
    for name, rec in records:
        diff = recipe_differences(first, rec) + row_differences(merged, rec)
        if diff:
            raise UsageError(f"{first_name} and {name} were made with different settings ({'; '.join(diff)}); "
                             "only runs of one recipe can be merged")
        merged["row_specs"].update(rec["row_specs"])
        for r in rec["runs"]:
            key = (r["row"], r["seed"])
            if key in owner:
                raise UsageError(f"{key[0]} seed {key[1]} is in both {owner[key]} and {name}; "
                                 "merge folders that hold different seeds or rows")
            owner[key] = name
            merged["runs"].append(r)
        for src in rec.get("sources") or [{"folder": name, "run": rec.get("run"), "rows": rec["rows"],
                                           "seeds": rec["seeds"], "complete": rec.get("complete")}]:
            merged["sources"].append(src)
    merged["requested_rows"] = ordered_rows([n for _, rec in records for n in rec["requested_rows"]],
                                            merged["row_specs"])
    merged["requested_seeds"] = sorted({s for _, rec in records for s in rec["requested_seeds"]})
    merged["seconds"] = sum(rec.get("seconds") or 0 for _, rec in records)
    return refresh(merged)
