"""Helpers shared by test folders (pytest puts ``tests/`` on ``sys.path``: ``from _helpers import ...``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(*, import_tests: bool = True, **variables: str) -> dict[str, str]:
    """The environment of a child process a test starts: this process's, with ``variables`` set and
    this checkout first on ``PYTHONPATH`` (so the child imports this ``tpa``, not an installed one);
    with ``import_tests`` also ``tests/``, so that it imports the test packages (``train.conftest``,
    ``data.corpus``) as the tests do."""
    paths = [str(REPO / "tests"), str(REPO)] if import_tests else [str(REPO)]
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
    return env
