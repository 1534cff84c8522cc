"""The ``tpa`` command: data / train / generate / eval / bench / ablate / convert.

Each subcommand lives in the package that owns it and exposes ``register(subparsers)``; this file
only wires them together. Heavy imports (torch, transformers) happen inside the handlers, so
``tpa --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand module, one-line help). Each module defines ``register(subparsers)``.
SUBCOMMANDS = [
    "tpa.data.cli",
    "tpa.train.cli",
    "tpa.train.demo",
    "tpa.generate",
    "tpa.eval.cli",
    "tpa.bench.cli",
    "tpa.bench.ablate",
    "tpa.convert.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpa",
        description="Tensor Product Attention: prepare data, train, generate, evaluate and benchmark T6 models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a subcommand whose package is not present yet
            if err.name and err.name.startswith("tpa"):
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
