"""Print the lower bound pyproject.toml declares for one dependency: `python .ci/oldest_requirement.py NAME`."""

import re
import sys
import tomllib
from pathlib import Path

name = sys.argv[1]
deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
for dep in deps:
    match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([0-9][0-9.]*)\s*(,.*)?", dep.strip())
    if match:
        print(match.group(1))
        break
else:
    sys.exit(f"pyproject.toml declares no '{name}>=VERSION' dependency")
