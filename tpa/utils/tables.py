"""Markdown tables and number formatting for result files."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


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
