"""``python -m tpa.bench.decode ARGS`` = ``tpa bench decode ARGS``."""

import argparse
import sys

from tpa.bench.decode import register

_parser = argparse.ArgumentParser(prog="python -m tpa.bench.decode")
register(_parser.add_subparsers(dest="cmd"))
_args = _parser.parse_args(["decode", *sys.argv[1:]])
sys.exit(_args.func(_args))
