"""The data of ``tpa ablate``: one row per finished run, per-type summaries over seeds, merging.

An ablation record (``ablation.json``, format ``tpa-ablation`` version 2) holds the settings shared by
every run (the *recipe*: preset, data, budget, optimizer, evaluation), the list ``runs`` with one row
per finished (attention type, seed) run (its numbers, loss curve, model and training configuration,
device and date), and ``results``: per attention type, the summary over its seeds that the table and
the plot show. ``results`` is derived from ``runs`` and recomputed whenever a record is read, merged
or extended.

Seeds: the run of seed ``s`` initialises the model with seed ``s`` and visits the training windows
in the order of data seed ``data_seed + s``, so seeds vary both sources of run-to-run noise, and a
seed's run is the same whichever other seeds it is run or merged with. With the default single seed
0 this is the one run the ablation made before seeds existed.

Records written before version 2 (one seed, per-type entries in ``results`` and no ``runs``) are read
through :func:`normalize`.
"""

from __future__ import annotations

import statistics

from tpa.bench.runs import perplexity
from tpa.eval.report import UsageError

FORMAT = "tpa-ablation"
VERSION = 2
ORDER = ("mha", "mqa", "gqa", "mla", "tpa_kvonly", "tpa")
LABELS = {"mha": "MHA", "mqa": "MQA", "gqa": "GQA", "mla": "MLA", "tpa_kvonly": "TPA-KVonly", "tpa": "TPA"}
# settings that must agree for runs to be compared (resumed into one folder, or merged)
RECIPE = ("preset", "data", "steps", "batch_size", "seq_len", "lr", "min_lr", "warmup_steps", "eval_every",
          "eval_sequences", "data_seed", "precision", "compile")
# per-run numbers that are a property of the attention type, not of the seed
STRUCTURE = ("parameters", "attention_params_per_layer", "heads", "kv_elements_per_token", "kv_bytes_per_token")


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
    record.setdefault("requested_types", list(record.get("types", [])))
    record.setdefault("data_fingerprint", None)
    record["format"], record["version"] = FORMAT, VERSION
    return refresh(record)


def refresh(record: dict) -> dict:
    """Recompute the derived fields from ``record["runs"]``, in place; returns ``record``.

    ``types`` and ``seeds`` are those with a finished run, ``results`` the per-type summaries,
    ``missing`` the requested (type, seed) pairs without a finished run, and ``complete`` says there
    are none.
    """
    runs = record["runs"]
    seen = set()
    for r in runs:
        key = (r["attention_type"], r["seed"])
        if key in seen:
            raise UsageError(f"{r['attention_type']} seed {r['seed']} appears twice in the runs")
        seen.add(key)
    record["types"] = ordered_types(r["attention_type"] for r in runs)
    record["seeds"] = sorted({r["seed"] for r in runs})
    record["results"] = {t: summarise([r for r in runs if r["attention_type"] == t]) for t in record["types"]}
    params = [s["parameters"] for s in record["results"].values()]
    record["parameter_spread"] = (max(params) - min(params)) / min(params) if params else None
    record["missing"] = [[t, s] for s in record["requested_seeds"] for t in ordered_types(record["requested_types"])
                         if (t, s) not in seen]
    record["complete"] = not record["missing"]
    return record


def summarise(runs: list[dict]) -> dict:
    """One attention type's summary over its seeds' runs (all of the same type).

    ``final_val_loss``, ``best_val_loss``, ``final_train_loss``, ``tokens_per_s`` and ``train_seconds``
    are means over the seeds; ``*_std`` the sample standard deviation (None with one seed);
    ``val_perplexity`` is exp of the mean final loss; ``final_val_losses`` lists the per-seed values in
    the order of ``seeds``; ``curve`` is the mean curve with the min and max over seeds at each step.

    Raises:
        UsageError: the runs disagree on parameter counts or cache size (not one configuration).
    """
    runs = sorted(runs, key=lambda r: r["seed"])
    t = runs[0]["attention_type"]
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
        "attention_type": t, **{k: runs[0].get(k) for k in STRUCTURE},
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


def merge(records: list[tuple[str, dict]]) -> dict:
    """One record from several ``(name, record)`` pairs of the same recipe (e.g. the same ablation
    split over device calls by ``--types`` or ``--seeds``).

    The first record's settings and run metadata are kept; ``runs`` and the requested types and seeds
    are the unions; ``seconds`` is the sum; ``sources`` names each input with its metadata.

    Raises:
        UsageError: different recipes, or one (type, seed) run in two records.
    """
    if not records:
        raise UsageError("nothing to merge")
    records = [(name, normalize(rec, name)) for name, rec in records]
    first_name, first = records[0]
    merged = {k: v for k, v in first.items() if k not in ("runs", "results", "sources")}
    merged["runs"], merged["sources"] = [], []
    owner: dict[tuple[str, int], str] = {}
    for name, rec in records:
        diff = recipe_differences(first, rec)
        if diff:
            raise UsageError(f"{first_name} and {name} were made with different settings ({'; '.join(diff)}); "
                             "only runs of one recipe can be merged")
        for r in rec["runs"]:
            key = (r["attention_type"], r["seed"])
            if key in owner:
                raise UsageError(f"{key[0]} seed {key[1]} is in both {owner[key]} and {name}; "
                                 "merge folders that hold different seeds or types")
            owner[key] = name
            merged["runs"].append(r)
        for src in rec.get("sources") or [{"folder": name, "run": rec.get("run"), "types": rec["types"],
                                           "seeds": rec["seeds"], "complete": rec.get("complete")}]:
            merged["sources"].append(src)
    merged["requested_types"] = ordered_types(t for _, rec in records for t in rec["requested_types"])
    merged["requested_seeds"] = sorted({s for _, rec in records for s in rec["requested_seeds"]})
    merged["seconds"] = sum(rec.get("seconds") or 0 for _, rec in records)
    return refresh(merged)
