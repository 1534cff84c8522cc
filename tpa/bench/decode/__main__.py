"""``python -m tpa.bench.decode ARGS`` = ``tpa bench decode ARGS``."""

import sys

from tpa.cli import main

sys.exit(main(["bench", "decode", *sys.argv[1:]]))
