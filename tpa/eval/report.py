"""Writing results: atomic JSON / CSV / text files, markdown tables, run metadata, model loading.

Shared by the evaluation commands (``tpa eval ...``) and the benchmarks (``tpa bench memory|train|
generate``, ``tpa ablate``). Every result file is written to a temporary sibling and renamed into
place, so a reader never sees a half-written file and an interrupted run leaves the previous one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence


class UsageError(ValueError):
    """A bad command-line argument; the CLI prints the message and exits with status 2."""


# --------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any):
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Standard JSON (NaN/inf written as strings), indented, atomically."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[dict], fields: Sequence[str]) -> Path:
    """One header line of ``fields`` and one line per row (missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Tables and formatting


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column: ``l`` or ``r`` (default: text
    columns left, the rest right)."""
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or any(len(r) != len(headers) for r in rows):
        raise ValueError("every row and the alignment need one entry per header")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt_int(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def fmt_bytes(n: float | None) -> str:
    """Bytes with a binary unit: ``36.0 KiB``, ``1.50 GiB``."""
    if n is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_float(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "ki": 2**10, "mib": 2**20, "mi": 2**20, "gib": 2**30,
          "gi": 2**30, "tib": 2**40, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"80GB"`` (10^9 bytes per GB), ``"80GiB"`` (2^30), ``"512MiB"``, ``"1e9"`` or a plain number of bytes."""
    text = str(text).strip()
    m = _SIZE.match(text)
    if m is None:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"cannot read {text!r} as a memory size (examples: 80GB, 80GiB, 512MiB)") from None
        unit = ""
    else:
        value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit not in _UNITS:
        raise UsageError(f"unknown unit in {text!r} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def parse_list(text: str | Sequence[str], allowed: Sequence[str] | None = None, what: str = "value") -> list[str]:
    """Comma- or space-separated names (``"all"`` means every allowed one); unknown names are an error."""
    items = text if isinstance(text, (list, tuple)) else [text]
    names: list[str] = []
    for item in items:
        names += [s for s in re.split(r"[,\s]+", str(item)) if s]
    if allowed is not None and names == ["all"]:
        return list(allowed)
    if not names:
        raise UsageError(f"no {what} given")
    if allowed is not None:
        bad = [n for n in names if n not in allowed]
        if bad:
            raise UsageError(f"unknown {what} {', '.join(map(repr, bad))}; expected some of "
                             f"{', '.join(allowed)} or 'all'")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def parse_ints(text: str | Sequence[str], what: str, minimum: int = 1) -> list[int]:
    """Comma/space-separated integers; ``4K`` means 4096, ``128K`` 131072."""
    out = []
    for name in parse_list(text, None, what):
        m = re.fullmatch(r"(\d+)([kKmM]?)", name)
        if m is None:
            raise UsageError(f"cannot read {name!r} as a {what} (an integer, optionally with K or M: 4K = 4096)")
        value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        if value < minimum:
            raise UsageError(f"{what} must be >= {minimum}, got {name}")
        out.append(value)
    return out


# --------------------------------------------------------------------------------------------------
# Devices, metadata, models


def resolve_device(name: str):
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is not there is an error."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device):
    """``auto`` -> bfloat16 on GPUs that have it, else float32."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise UsageError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_metadata(device, argv: Sequence[str] | None = None) -> dict:
    """Date, command line, git revision, package versions and device, to store next to results."""
    from tpa.train.metrics import run_info

    info = run_info(device, 1, list(sys.argv if argv is None else argv))
    info["device_name"] = device_name(device)
    info["date"] = time.strftime("%Y-%m-%d")
    return info


def check_model_dir(path: str | os.PathLike) -> Path:
    """The folder must hold a HuggingFace ``config.json``; otherwise a clear :class:`UsageError`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UsageError(f"{str(path)!r} is a file, not a model directory (save_pretrained output)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is not a model directory: it has no config.json "
                         "(expected the output of save_pretrained or `tpa train`'s RUN_DIR/final)")
    return path


def load_model_and_tokenizer(path: str | os.PathLike, device, dtype):
    """Load a saved causal LM (T6 or any transformers model) and its tokenizer, in eval mode on ``device``.

    Raises:
        UsageError: not a model directory, no tokenizer in it, or a tokenizer with ids beyond the
            model's vocabulary.
    """
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpa  # noqa: F401  (registers T6 with the Auto classes)
    from tpa.models.t6 import check_tokenizer_fits

    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise UsageError(f"{str(path)!r} holds no loadable tokenizer ({err}); save one with "
                         "tpa.models.t6.save_model_and_tokenizer") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"could not load a causal language model from {str(path)!r}: {err}") from None
    check_tokenizer_fits(model.config, tokenizer)
    return model.to(device).eval(), tokenizer


def model_label(path: str | os.PathLike) -> str:
    """A short name for a model directory: its folder name, with the run's name in front for
    ``tpa train`` exports (``RUN_DIR/final`` -> ``RUN/final``)."""
    p = Path(path).resolve()
    return f"{p.parent.name}/{p.name}" if p.name == "final" else p.name


def print_written(paths: Iterable[str | os.PathLike]) -> None:
    for p in paths:
        print(f"wrote {p}")
