"""Command-line plumbing shared by every ``tpa`` command: the usage error, lazy handlers, command
groups and commands, the options several commands share (``--output``, ``--device``,
``--precision``), and parsers of sizes, lists and integers."""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
from typing import Callable, Sequence


class UsageError(ValueError):
    """A bad command-line argument; the CLI prints the message and exits with status 2."""


def reporting_usage_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command handler that prints a :class:`UsageError` as ``error: ...`` and returns 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    run.__qualname__ = getattr(fn, "__qualname__", "handler")
    return run


def handler(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command handler that imports ``module`` only when the command runs (``tpa --help`` stays
    cheap; an import error then surfaces as itself, never as a missing command) and reports a
    :class:`UsageError` as ``error: ...`` with exit status 2."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = f"handler({module}.{name})"
    return reporting_usage_errors(run)


def module_doc(module: str) -> str:
    """The docstring of a command's implementation module (its ``--help`` description); those modules
    import torch and transformers inside their functions only, so this import is cheap."""
    return importlib.import_module(module).__doc__ or ""


def add_command_group(subparsers, name: str, *, help: str, dest: str, metavar: str,
                      description: str | None = None):
    """``tpa NAME SUBCOMMAND ...``: a command of subcommands that prints its help and exits with
    status 2 when no subcommand is given. Returns the action to add the subcommands to."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return parser.add_subparsers(dest=dest, metavar=metavar)


def add_command(subparsers, name: str, *, help: str, module: str, entry: str = "_run",
                description: str | None = None) -> argparse.ArgumentParser:
    """A command run by ``module.entry`` (imported when it runs, :func:`handler`). Its ``--help``
    description is ``description`` (wrapped by argparse), or by default the module's docstring as
    written (:func:`module_doc`). Returns its parser, for its arguments."""
    if description is not None:
        parser = subparsers.add_parser(name, help=help, description=description)
    else:
        parser = subparsers.add_parser(name, help=help, description=module_doc(module),
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=handler(module, entry))
    return parser


def add_device_argument(parser: argparse.ArgumentParser, help: str = "cpu, cuda, cuda:N or auto") -> None:
    """``--device`` (default ``auto``: CUDA where there is a GPU)."""
    parser.add_argument("--device", default="auto", help=help)


def add_precision_argument(parser: argparse.ArgumentParser, help: str | None = "bf16 autocast or fp32") -> None:
    """``--precision auto|bf16|fp32`` of a training run (auto: bf16 autocast where the GPU has it)."""
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help=help)


class _DeprecatedOutputAlias(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use --output", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output_argument(parser: argparse.ArgumentParser, *, help: str, default: str | None = None,
                        required: bool = False, dest: str = "output") -> None:
    """``--output DIR``, the one name of every command's output folder; ``--out`` (the older name of
    some commands) still works, with a deprecation warning."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--output", dest=dest, default=default, metavar="DIR", help=help)
    group.add_argument("--out", dest=dest, default=default, action=_DeprecatedOutputAlias, help=argparse.SUPPRESS)


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
