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


# Modules a fresh trainer process imports (torch, transformers with what it pulls in): seconds on a CPU,
# imported once by the fork server of :class:`ForkedPython`.
FORKSERVER_PRELOAD = ["tpa.train.trainer", "tpa.models.t6.modeling_t6", "tpa.data.prepare"]


def _run_script(script: str, stdout: str, stderr: str, argv: list[str], env: dict[str, str] | None) -> None:
    """The child of :class:`ForkedPython`: ``script`` as ``__main__`` with ``sys.argv[1:] = argv`` (and
    ``env`` as its whole environment, if given), its output to the files named."""
    import sys

    for path, target in ((stdout, 1), (stderr, 2)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    sys.argv = ["-c", *argv]
    exec(compile(script, "<script>", "exec"), {"__name__": "__main__"})


class ForkedPython:
    """A Python script in a process of its own (its own pid and memory: it can be killed at any point),
    forked from a server that has imported :data:`FORKSERVER_PRELOAD` once, so that it starts in a
    fraction of a second rather than the seconds ``python -c SCRIPT`` spends importing. The interface of
    the ``subprocess.Popen`` it replaces: ``pid``, ``poll()``, ``wait(timeout)``, ``returncode``
    (negative: killed by that signal; ``sys.exit(n)`` gives n), ``send_signal(sig)``; ``stdout()`` and
    ``stderr()`` are what it wrote there (to ``LOG.out`` and ``LOG.err``). Its working folder and
    ``sys.path`` are this process's when the fork server started (tests/ on the path, as with
    :func:`subprocess_env`), and so is its environment unless ``env`` gives another."""

    def __init__(self, script: str, log: Path, argv: list[str] = (), env: dict[str, str] | None = None):
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
        self._out, self._err = Path(f"{log}.out"), Path(f"{log}.err")
        args = (script, str(self._out), str(self._err), [str(a) for a in argv], env)
        self._process = context.Process(target=_run_script, args=args)
        self._process.start()

    @classmethod
    def cli(cls, argv: list[str], log: Path, env: dict[str, str] | None = None) -> ForkedPython:
        """``tpa ARGV`` (:func:`tpa.cli.main`; its return value is the exit status)."""
        return cls("import sys\nfrom tpa.cli import main\nsys.exit(main(sys.argv[1:]))\n", log, argv, env)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"script logging to {self._err}", timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self._process.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def stdout(self) -> str:
        return self._out.read_text() if self._out.is_file() else ""

    def stderr(self) -> str:
        return self._err.read_text() if self._err.is_file() else ""
