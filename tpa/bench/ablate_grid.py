"""The rows of ``tpa ablate``: named model/training overrides, read from ``--row`` and YAML files, and
resolved into the model each row trains (its head count matched to MHA's attention parameters, or fixed).

A row is a name and a mapping of settings::

    --row tpa_r1:attention_type=tpa,k_rank=1,v_rank=1
    --rows studies/ranks.yaml          # rows: [{name: tpa_r1, attention_type: tpa, k_rank: 1, v_rank: 1}, ...]

Keys of a row:

- ``attention_type`` (required): one of the T6 attention types;
- any other :class:`~tpa.models.t6.configuration_t6.T6Config` field (``k_rank``, ``tpa_contextual_a``,
  ``attention_output_gate``, ``num_attention_heads``, ``head_dim``, ...), given to
  :meth:`T6Config.from_preset` on top of the preset;
- ``lr`` and ``min_lr``: the row's peak and final learning rate (default: the ablation's ``--lr``; the
  final rate is ``--min-lr`` if given, else the row's ``lr / 10``);
- ``heads_of``: an attention type whose head count at the preset this row takes (e.g. TPA at MHA's
  head count: ``attention_type=tpa,heads_of=mha``);
- ``match_params``: how the attention parameters of the row are set against MHA's at the preset
  (``4 d_model H_MHA d_h`` per layer, the paper's rule):

  - ``true`` (or ``heads``; the default unless the row fixes its heads): the head count is chosen as
    the presets choose it. A row whose attention layer has the preset's parameter count for its
    type (no override that changes it) gets the preset's head count (Table 10's at the paper's sizes);
    otherwise the head count whose attention layer, built with the row's overrides and counted
    parameter by parameter, is closest to MHA's;
  - ``head_dim``: the head count stays (as given, ``heads_of``, or the preset's) and the head
    dimension (even, for RoPE) is chosen whose attention parameters are closest to MHA's: MHA and
    GQA at TPA's head count with their projections narrowed;
  - ``false``: no matching; the preset's head count unless ``num_attention_heads`` or ``heads_of``
    gives one (which is the default then).

Budget, data, data order, evaluation and seeds are the ablation's, the same for every row; settings
of the schedule or the data cannot be given per row.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from tpa.utils.args import UsageError

ROW_TRAIN_KEYS = ("lr", "min_lr")
ROW_GRID_KEYS = ("attention_type", "match_params", "heads_of")
# T6Config fields that the data or the ablation fixes (vocabulary, sequence length, token ids)
FIXED_MODEL_KEYS = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                    "use_cache")
MATCH_VALUES = {"true": "heads", "heads": "heads", "head_dim": "head_dim", "false": "none", "none": "none"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def model_keys() -> tuple[str, ...]:
    """The T6Config fields a row may set."""
    from tpa import T6Config

    names = [n for n, p in inspect.signature(T6Config.__init__).parameters.items()
             if n not in ("self", "kwargs") and p.kind is p.POSITIONAL_OR_KEYWORD]
    return tuple(n for n in names if n not in FIXED_MODEL_KEYS and n != "attention_type")


def parse_value(text: str):
    """A ``--row`` value as YAML reads a scalar: ``1`` int, ``2e-3`` float, ``true`` bool, else a string."""
    import yaml

    text = text.strip()
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", text):  # YAML 1.1 reads 2e-3 as a string
        return float(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def parse_row(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> ``(NAME, {key: value})``.

    Raises:
        UsageError: no name, a setting without ``=``, or a key given twice.
    """
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise UsageError(f"--row {text!r}: expected NAME:key=value,key=value (e.g. "
                         "tpa_r1:attention_type=tpa,k_rank=1,v_rank=1)")
    spec: dict = {}
    for item in (x for x in rest.split(",") if x.strip()):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise UsageError(f"--row {name}: {item!r} is not key=value")
        if key in spec:
            raise UsageError(f"--row {name}: {key} is given twice")
        spec[key] = parse_value(value)
    return name.strip(), spec


def read_rows_file(path: str | Path) -> list[tuple[str, dict]]:
    """The rows of a YAML file: ``rows:`` a list of mappings, each with a ``name`` (other top-level
    keys, e.g. ``description``, are ignored).

    Raises:
        UsageError: the file is missing, not YAML, or not of that shape.
    """
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as err:
        raise UsageError(f"--rows: cannot read {path}: {err}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"--rows: {path} is not valid YAML: {err}") from None
    rows = loaded.get("rows") if isinstance(loaded, dict) else None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"--rows: {path} needs a non-empty list `rows:` of mappings with a `name`")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise UsageError(f"--rows: {path}: row {i + 1} is not a mapping with a string `name`")
        spec = {str(k).replace("-", "_"): v for k, v in row.items() if k != "name"}
        out.append((row["name"], spec))
    return out


def collect_rows(types: list[str] | None, row_args: list[str] | None, row_files: list[str] | None) -> list[tuple[str, dict]]:
    """The grid's rows in order: one per attention type of ``types``, then the files', then ``--row``'s.

    Raises:
        UsageError: a bad name, or a name used twice.
    """
    rows = [(t, {"attention_type": t}) for t in types or []]
    for path in row_files or []:
        rows += read_rows_file(path)
    rows += [parse_row(text) for text in row_args or []]
    seen = set()
    for name, _ in rows:
        if not _NAME.fullmatch(name):
            raise UsageError(f"row name {name!r}: use letters, digits and _ . + - (it names the run's folder)")
        if name in seen:
            raise UsageError(f"row {name!r} is given twice; every row needs its own name")
        seen.add(name)
    return rows


def attention_layer_parameters(config) -> int:
    """Parameters of one attention layer of ``config`` (every projection, the gate and any learned
    non-contextual factor), counted on the ``meta`` device."""
    import torch

    from tpa.models.t6.modeling_t6 import build_attention

    with torch.device("meta"):
        layer = build_attention(config, out_init_std=config.initializer_range)
    return sum(p.numel() for p in layer.parameters())


def _match_value(name: str, value) -> str:
    key = str(value).lower()
    if key not in MATCH_VALUES:
        raise UsageError(f"row {name}: match_params must be true, false, heads or head_dim, got {value!r}")
    return MATCH_VALUES[key]


def _build(name: str, preset: str, attention_type: str, model: dict):
    from tpa import T6Config

    try:
        return T6Config.from_preset(preset, attention_type, **model)
    except (ValueError, TypeError) as err:
        raise UsageError(f"row {name}: {err}") from None


def _closest(name: str, preset: str, attention_type: str, model: dict, key: str, candidates, target: int):
    """The candidate value of ``key`` whose attention layer is closest to ``target`` parameters.

    The count grows with the head count and the head dimension, so a bisection over the candidates
    that make a valid configuration (GQA's KV groups must divide the heads) finds the two values
    around ``target``; the smaller wins a tie.
    """
    from tpa import T6Config

    configs, why = [], None
    for value in candidates:
        try:
            configs.append((value, T6Config.from_preset(preset, attention_type, **{**model, key: value})))
        except ValueError as err:
            why = err
    if not configs:
        raise UsageError(f"row {name}: no {key} gives a valid {attention_type} configuration at preset {preset} "
                         f"({why}); give num_attention_heads (and num_key_value_heads) that fit")
    lo, hi = 0, len(configs) - 1
    while lo < hi:  # the first candidate with at least ``target`` parameters (or the last)
        mid = (lo + hi) // 2
        if attention_layer_parameters(configs[mid][1]) >= target:
            hi = mid
        else:
            lo = mid + 1
    near = [i for i in (lo - 1, lo) if i >= 0]
    best = min(near, key=lambda i: abs(attention_layer_parameters(configs[i][1]) - target))
    return configs[best][0]


def resolve_row(name: str, spec: dict, preset: str, *, lr: float, min_lr: float | None) -> dict:
    """The row's resolved settings: ``attention_type``, ``model_overrides`` (T6Config fields with the
    chosen ``num_attention_heads``/``head_dim``), ``lr``, ``min_lr``, ``match`` and the resulting
    ``heads``, ``head_dim`` and ``attention_params_per_layer`` (counted), and ``spec`` as given.

    ``min_lr`` is the ablation's ``--min-lr`` (None: the row's ``lr / 10``).

    Raises:
        UsageError: an unknown key, a missing or unknown attention type, or a configuration T6 rejects.
    """
    from tpa import T6Config
    from tpa.models.presets import ATTENTION_TYPES, attention_parameters

    allowed = set(model_keys()) | set(ROW_TRAIN_KEYS) | set(ROW_GRID_KEYS)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        fixed = [k for k in unknown if k in FIXED_MODEL_KEYS]
        why = (f" ({', '.join(fixed)} follow the data and --seq-len)" if fixed else
               "; schedule and data settings are the ablation's, the same for every row")
        raise UsageError(f"row {name}: unknown key {', '.join(unknown)}{why}. A row sets attention_type, "
                         "match_params, heads_of, lr, min_lr or T6Config fields such as k_rank, head_dim")
    attention_type = spec.get("attention_type")
    if attention_type not in ATTENTION_TYPES:
        raise UsageError(f"row {name}: attention_type must be one of {', '.join(ATTENTION_TYPES)}, "
                         f"got {attention_type!r}")
    model = {k: v for k, v in spec.items() if k not in ROW_TRAIN_KEYS and k not in ROW_GRID_KEYS}
    heads_of = spec.get("heads_of")
    if heads_of is not None:
        if heads_of not in ATTENTION_TYPES:
            raise UsageError(f"row {name}: heads_of must be an attention type, got {heads_of!r}")
        if "num_attention_heads" in model:
            raise UsageError(f"row {name}: give heads_of or num_attention_heads, not both")
        model["num_attention_heads"] = T6Config.from_preset(preset, heads_of).num_attention_heads
    fixed_heads = "num_attention_heads" in model
    match = _match_value(name, spec.get("match_params", "false" if fixed_heads else "true"))
    if match == "heads" and fixed_heads:
        raise UsageError(f"row {name}: match_params=true chooses the head count; drop num_attention_heads/heads_of "
                         "or use match_params=head_dim (or false)")
    reference = T6Config.from_preset(preset, "mha")
    target = attention_parameters("mha", reference.hidden_size, reference.num_attention_heads, reference.head_dim)
    if match == "heads":
        config = _build(name, preset, attention_type, model)
        plain = T6Config.from_preset(preset, attention_type)
        if attention_layer_parameters(config) != attention_layer_parameters(plain):
            mha_heads = reference.num_attention_heads
            model["num_attention_heads"] = _closest(name, preset, attention_type, model, "num_attention_heads",
                                                    range(1, 8 * mha_heads + 8), target)
    elif match == "head_dim":
        if "head_dim" in model:
            raise UsageError(f"row {name}: match_params=head_dim chooses head_dim; do not give it too")
        model["head_dim"] = _closest(name, preset, attention_type, model, "head_dim",
                                     range(2, 4 * reference.head_dim + 1, 2), target)
    config = _build(name, preset, attention_type, model)
    try:
        row_lr = float(spec.get("lr", lr))
        row_min_lr = float(spec["min_lr"]) if "min_lr" in spec else (row_lr / 10 if min_lr is None else min_lr)
    except (TypeError, ValueError):
        raise UsageError(f"row {name}: lr and min_lr must be numbers, got {spec.get('lr')!r}, "
                         f"{spec.get('min_lr')!r}") from None
    if row_lr <= 0 or not 0 <= row_min_lr <= row_lr:
        raise UsageError(f"row {name}: need 0 <= min_lr <= lr and lr > 0, got lr {row_lr:g}, min_lr {row_min_lr:g}")
    return {"name": name, "spec": dict(spec), "attention_type": attention_type, "model_overrides": model,
            "lr": row_lr, "min_lr": row_min_lr, "match": match, "heads": config.num_attention_heads,
            "head_dim": config.head_dim, "attention_params_per_layer": attention_layer_parameters(config),
            "target_attention_params": target}


def describe(row: dict, lr: float) -> str:
    """One line saying what a row trains: its settings, the head count and how it was chosen."""
    from tpa.bench.ablate_results import LABELS

    settings = [f"{k}={v}" for k, v in row["spec"].items() if k not in ("attention_type", "match_params")]
    how = {"heads": "matched to MHA's attention parameters", "head_dim": "fixed; head_dim matched to MHA's "
           "attention parameters", "none": "fixed"}.get(row.get("match"), "")
    text = f"{LABELS.get(row['attention_type'], row['attention_type'])}"
    if settings:
        text += ", " + ", ".join(settings)
    if row.get("heads"):
        text += f"; {row['heads']} heads of {row['head_dim']} ({how})"
    if row.get("lr") is not None and row["lr"] != lr:
        text += f"; lr {row['lr']:g} -> {row['min_lr']:g}"
    return text


def plan_markdown(rows: list[dict], preset: str, *, vocab_size: int, seq_len: int, tokens: int, seeds: int) -> str:
    """What a grid would train, without training: per row the heads, head_dim, attention parameters
    per layer, model parameters and training FLOPs per token (:func:`tpa.train.metrics.flops_per_token`
    at ``seq_len``), then the number of runs and the total training FLOPs over ``tokens`` per run."""
    import torch

    from tpa import T6Config, T6ForCausalLM
    from tpa.bench.ablate_results import LABELS
    from tpa.utils.tables import fmt_int, markdown_table
    from tpa.train.metrics import flops_per_token

    table, total = [], 0.0
    for row in rows:
        config = T6Config.from_preset(preset, row["attention_type"], vocab_size=vocab_size,
                                      max_position_embeddings=seq_len, **row["model_overrides"])
        with torch.device("meta"):
            model = T6ForCausalLM(config)
        flops = flops_per_token(model, config, seq_len)
        total += flops * tokens * seeds
        table.append([row["name"], LABELS.get(row["attention_type"], row["attention_type"]), row["heads"],
                      row["head_dim"], fmt_int(row["attention_params_per_layer"]),
                      fmt_int(sum(p.numel() for p in model.parameters())), f"{flops / 1e9:.3f}", f"{row['lr']:g}"])
    text = markdown_table(["row", "attention", "heads", "head_dim", "attn. params / layer", "params",
                           "GFLOP / token", "lr"], table, align="llrrrrrr")
    return (f"Plan: preset {preset}, vocabulary {fmt_int(vocab_size)}, sequence {seq_len}; {len(rows)} rows x "
            f"{seeds} seeds = {len(rows) * seeds} runs of {fmt_int(tokens)} training tokens, "
            f"{total / 1e15:.1f} PFLOP of training in all (6 x parameters + 12 x layers x heads x head_dim x "
            f"sequence per token).\n\n" + text)
