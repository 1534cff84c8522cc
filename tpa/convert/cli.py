"""The ``tpa convert`` command group: one subcommand per source format, each registered by its module."""

from __future__ import annotations

import importlib

# modules defining ``register(subparsers)`` for one ``tpa convert SOURCE`` subcommand
CONVERTERS = [
    "tpa.convert.official",
    "tpa.convert.llama",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="turn other checkpoints into T6 directories",
                                   description="Convert a checkpoint of another code base into a T6 directory "
                                               "(verified against the source before it is written).")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    for name in CONVERTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a converter that is not present in this checkout
            if err.name == name:
                continue
            raise
        module.register(sources)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
