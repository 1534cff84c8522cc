"""The ``tpa`` command: data / train / demo / generate / eval / bench / ablate / convert.

One pattern for every command: the ``cli.py`` of the package that implements it declares its parser
(``register(subparsers)``) and points it at a handler that imports the implementation only when the
command runs, so ``tpa --help`` imports neither torch nor transformers. ``tpa generate`` is
implemented by the top-level :mod:`tpa.generate`, so its parser is declared here. A command module
that fails to import is an error, never a missing command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tpa.utils.args import add_command

# the packages' command modules, each with ``register(subparsers)``
COMMAND_MODULES = ["tpa.data.cli", "tpa.train.cli", "tpa.eval.cli", "tpa.bench.cli", "tpa.convert.cli"]


def _register_generate(subparsers) -> None:
    p = add_command(subparsers, "generate", module="tpa.generate",
                    help="generate text from a model directory (streams, uses the KV cache)",
                    description="Generate text from a HuggingFace model directory written by `tpa train` "
                                "(or any causal LM with a tokenizer), streaming tokens as they come.")
    p.add_argument("--model", required=True, help="model directory (save_pretrained + tokenizer)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from the bos token)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0: off)")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token each step (no sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype (auto: bfloat16 on GPUs that have it, else float32)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps as CUDA-graph replays over a static cache (T6 models; default: on with CUDA)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (launch with `torchrun --nproc_per_node N`; T6 models): each rank "
                        "holds its heads' weights and cache, every rank prints nothing but rank 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpa",
        description="Tensor Product Attention: prepare data, train, generate, evaluate and benchmark T6 models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _register_generate(subparsers)
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
