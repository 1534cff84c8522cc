"""``tpa train`` and ``tpa demo``: train a T6 model (any preset and attention type) on prepared token shards."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tpa.train.config import TrainConfig, _field_type
from tpa.utils.args import add_command, module_doc


def _add_fields(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group(
        "configuration fields", "each can also be set in the --config YAML file; the values shown are the "
        "dataclass defaults, which a preset may change (see `tpa.train.config.preset_values`)")
    for f in dataclasses.fields(TrainConfig):
        base, optional = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if base is bool and not optional:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            metavar = {int: "INT", float: "FLOAT", str: "STR", dict: "JSON", bool: "BOOL"}.get(base, "VALUE")
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_demo(subparsers)


def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a T6 model on prepared token shards (CPU, GPU, torchrun DDP/FSDP2)",
        description=(
            "Train a T6 model. Values come from the preset (--preset), then the YAML file (--config), then the "
            "options below. Several GPUs: `torchrun --nproc_per_node N -m tpa.cli train ... --parallel fsdp`."
        ),
    )
    parser.add_argument("--config", default=None, help="YAML file of configuration fields")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    _add_fields(parser)
    parser.set_defaults(func=_run)


def _register_demo(subparsers) -> None:
    p = add_command(subparsers, "demo", module="tpa.train.demo",
                    help="prepare Shakespeare, train tiny TPA and MHA models, compare, sample",
                    description=module_doc("tpa.train.demo").split("\n\n")[1])
    p.add_argument("--source", nargs="+", default=["shakespeare"],
                   help="corpus to prepare (as for `tpa data prepare`); default: the Shakespeare corpus")
    p.add_argument("--data-dir", default="data/shakespeare", help="where the prepared corpus goes")
    p.add_argument("--runs", default="runs/demo", help="where the two runs go")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the tiny preset's)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the corpus")
    p.add_argument("--prompt", default="KING.\n", help="prompt for the sample")
    p.add_argument("--max-new-tokens", type=int, default=120, help="length of the sample")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")


def _run(args) -> int:
    from tpa.train.config import build_config

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    try:
        cfg = build_config(args.config, overrides)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from tpa.data.sources import DataError
    from tpa.train.checkpoint import CorruptCheckpoint
    from tpa.train.metrics import MissingPackage
    from tpa.train.runlock import RunDirLocked
    from tpa.train.trainer import SIGNAL_EXIT_BASE, NonFiniteLoss, train

    try:
        result = train(cfg, argv=sys.argv)
    except (NonFiniteLoss, DataError, CorruptCheckpoint) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, MissingPackage, RunDirLocked) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk or a folder that cannot be written
        print(f"error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", file=sys.stderr)
        return 1
    if result.stopped == "signal":
        return SIGNAL_EXIT_BASE + result.signal
    return 0
