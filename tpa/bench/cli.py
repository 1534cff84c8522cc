"""``tpa bench ...``: each benchmark module defines ``register(subparsers)`` for its own subcommand."""

from __future__ import annotations

import importlib

BENCHMARKS = [
    "tpa.bench.decode",
    "tpa.bench.memory",
    "tpa.bench.train",
    "tpa.bench.generate",
    "tpa.bench.convert",
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: decode kernel, KV-cache memory, training, generation, conversion")
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("tpa"):
                continue
            raise
        module.register(bench_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
