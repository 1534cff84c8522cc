"""lm-evaluation-harness glue (``tpa eval harness``): evaluate a saved model directory on lm-eval tasks
and write the results as JSON and as a markdown table in the paper's format.

The model and its tokenizer are loaded with ``import tpa`` (so T6 needs no remote code), wrapped in
lm-eval's ``HFLM`` and passed to ``lm_eval.simple_evaluate``, once per few-shot setting (the paper
reports 0-shot and 2-shot). A saved T6 directory also works with lm-eval's own command line,
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``, through the ``auto_map``
code that ``save_pretrained`` writes; both routes run the same model code and give the same numbers.

The table has the tasks as columns, in the paper's order where they are the paper's benchmarks
(ARC-E, ARC-C, BoolQ, HellaSwag, OBQA, PIQA, WinoGrande, MMLU, SciQ), one row per few-shot setting,
and the metric the paper reports: ``acc_norm`` for ARC-E, ARC-C, HellaSwag, OBQA, PIQA and SciQ,
``acc`` for the others, in percent. Other tasks show ``acc`` (else ``acc_norm``, else their first
metric: perplexities and bits per byte as they are). ``Avg.`` is the mean of the accuracy columns.

Local tasks (a task YAML and its data files) are found through ``--include-path``. Datasets named by
the paper's tasks are downloaded by lm-eval from the HuggingFace hub, so they need network access.
"""

from __future__ import annotations

import os
from pathlib import Path

from tpa.utils.args import UsageError

# lm-eval task name -> (column label as in the paper's Tables 2-3, metric the paper reports)
PAPER_TASKS = {
    "arc_easy": ("ARC-E", "acc_norm"),
    "arc_challenge": ("ARC-C", "acc_norm"),
    "boolq": ("BoolQ", "acc"),
    "hellaswag": ("HellaSw.", "acc_norm"),
    "openbookqa": ("OBQA", "acc_norm"),
    "piqa": ("PIQA", "acc_norm"),
    "winogrande": ("W.G.", "acc"),
    "mmlu": ("MMLU", "acc"),
    "sciq": ("SciQ", "acc_norm"),
}
# metric preference for tasks outside the paper; the first ones are accuracies (shown in percent)
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match", "mcc", "f1")
OTHER_METRICS = ("word_perplexity", "perplexity", "byte_perplexity", "bits_per_byte")


def expand_tasks(names: list[str]) -> list[str]:
    """``paper`` stands for the paper's nine benchmarks; duplicates are dropped, order kept."""
    out: list[str] = []
    for name in names:
        for task in (PAPER_TASKS if name == "paper" else [name]):
            if task not in out:
                out.append(task)
    return out


def task_metric(task: str, metrics: dict) -> tuple[str, str, bool] | None:
    """``(label, metric, is_accuracy)`` to show for ``task`` given its lm-eval result dict
    (keys such as ``"acc,none"``), or None when it has no metric this table knows."""
    available = {key.split(",")[0] for key in metrics if "," in key and not key.split(",")[0].endswith("_stderr")}
    if task in PAPER_TASKS:
        label, metric = PAPER_TASKS[task]
        if metric in available:
            return label, metric, True
    for metric in ACCURACY_METRICS:
        if metric in available:
            return task, metric, True
    for metric in OTHER_METRICS:
        if metric in available:
            return task, metric, False
    return None


def _metric_value(metrics: dict, metric: str) -> float | None:
    for key, value in metrics.items():
        if key.split(",")[0] == metric and isinstance(value, (int, float)):
            return float(value)
    return None


def table_rows(runs: dict[int, dict], tasks: list[str]) -> tuple[list[str], list[dict]]:
    """Columns (paper tasks first, in the paper's order, then the others as given) and one row per
    few-shot setting: ``{"n_shot", "values": {column: value}, "metrics": {column: metric}, "avg"}``."""
    ordered = [t for t in PAPER_TASKS if t in tasks] + [t for t in tasks if t not in PAPER_TASKS]
    columns: list[str] = []
    rows = []
    for n_shot, result in runs.items():
        values, metrics, accuracies = {}, {}, []
        for task in ordered:
            res = result.get("results", {}).get(task)
            if res is None:
                continue
            chosen = task_metric(task, res)
            if chosen is None:
                continue
            label, metric, is_acc = chosen
            value = _metric_value(res, metric)
            if value is None:
                continue
            if label not in columns:
                columns.append(label)
            values[label] = 100.0 * value if is_acc else value
            metrics[label] = metric
            if is_acc:
                accuracies.append(100.0 * value)
        rows.append({"n_shot": n_shot, "values": values, "metrics": metrics,
                     "avg": sum(accuracies) / len(accuracies) if accuracies else None})
    return columns, rows


def paper_table(model_name: str, columns: list[str], rows: list[dict]) -> str:
    """Markdown: ``Method | n-shot | <tasks> | Avg.`` with two decimals, as in the paper's tables."""
    from tpa.utils.tables import markdown_table

    headers = ["Method", "n-shot"] + columns + ["Avg."]
    body = []
    for row in rows:
        cells = [model_name, str(row["n_shot"])]
        for col in columns:
            v = row["values"].get(col)
            cells.append("" if v is None else f"{v:.2f}")
        cells.append("" if row["avg"] is None else f"{row['avg']:.2f}")
        body.append(cells)
    table = markdown_table(headers, body, align="ll" + "r" * (len(columns) + 1))
    used = {}
    for row in rows:
        used.update(row["metrics"])
    notes = ", ".join(f"{c}: {m}" for c, m in used.items())
    return table + (f"\nMetrics: {notes}; accuracies in percent.\n" if notes else "")


def _task_manager(include_path: list[str] | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include_path] if include_path else None)


def run_harness(model_dir: str, tasks: list[str], *, num_fewshot: list[int] | None = None, batch_size: int = 1,
                limit: float | None = None, device: str = "auto", dtype: str = "auto", output: str | None = None,
                include_path: list[str] | None = None, bootstrap_iters: int = 1000, seed: int = 1234,
                argv: list[str] | None = None) -> dict:
    """Evaluate ``model_dir`` on ``tasks`` for every few-shot count; write ``harness.json`` and
    ``harness.md`` under ``output``; return the JSON record.

    Raises:
        UsageError: not a model directory, an unknown task, a bad few-shot count, batch size or limit.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise UsageError("`tpa eval harness` needs lm-evaluation-harness: "
                         f"pip install 'tensor-product-attention[eval]' ({err})") from None
    from tpa.models.t6.loading import load_model_and_tokenizer, model_label
    from tpa.utils.devices import resolve_device, resolve_dtype
    from tpa.utils.files import atomic_write_json, atomic_write_text, print_written
    from tpa.utils.runinfo import run_metadata

    num_fewshot = [0] if not num_fewshot else list(num_fewshot)
    if any(n < 0 for n in num_fewshot):
        raise UsageError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be positive (a count, or a fraction below 1), got {limit}")
    tasks = expand_tasks(tasks)
    if not tasks:
        raise UsageError("no --tasks given")
    for p in include_path or []:
        if not Path(p).is_dir():
            raise UsageError(f"--include-path {p!r} is not a folder of task YAML files")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model, tokenizer = load_model_and_tokenizer(model_dir, dev, torch_dtype)
    manager = _task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: not among lm-eval's tasks"
                         + (f" nor in --include-path {include_path}" if include_path else
                            " (local task YAML files need --include-path)"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    runs: dict[int, dict] = {}
    for n in num_fewshot:
        result = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=n, limit=limit, task_manager=manager,
                                         log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=0,
                                         numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        if result is None:  # only on non-zero ranks of a distributed run
            continue
        runs[n] = {key: result.get(key) for key in ("results", "groups", "group_subtasks", "versions", "n-shot",
                                                    "higher_is_better", "n-samples", "configs")}
    columns, rows = table_rows(runs, tasks)
    name = model_label(model_dir)
    record = {
        "model": str(model_dir),
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "table": {"columns": columns, "rows": rows},
        "runs": {str(n): r for n, r in runs.items()},
        "run": run_metadata(dev, argv),
    }
    out = Path(output or Path("runs") / "eval" / f"harness-{name.replace('/', '-')}")
    table = paper_table(name, columns, rows)
    header = (f"lm-evaluation-harness {record['lm_eval_version']} on `{model_dir}` ({record['dtype']}), "
              f"{record['run']['device_name']}, {record['run']['date']}"
              + (f", limit {limit} documents per task" if limit else "") + ".\n\n")
    paths = [atomic_write_json(out / "harness.json", record), atomic_write_text(out / "harness.md", header + table)]
    print(table, end="")
    print_written(paths)
    return record


def go_offline() -> None:
    """Keep lm-eval, datasets and the hub client off the network (for local tasks); must run before
    they are imported, which the CLI handlers do after parsing arguments."""
    import sys

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported (transformers is): its flag was read at import time
        constants.HF_HUB_OFFLINE = True
