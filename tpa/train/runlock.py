"""An exclusive lock on a run directory, so two trainers never write into the same one.

The lock is ``RUN_DIR/.lock``, held with ``flock`` for the life of the run (the operating system
drops it when the process dies, however it dies, so a killed run never leaves a lock behind). The
file says who holds it (host, process id, start time); a second trainer gets :class:`RunDirLocked`
naming that holder. On platforms without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """``with RunLock(run_dir):`` creates ``run_dir`` if needed and holds its lock.

    Raises :class:`RunDirLocked` when another process holds it, and ``PermissionError`` (an OSError,
    with the path) when the folder cannot be written. A folder this lock created and that holds only
    the lock file when it is released (the run failed before writing anything) is removed again.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                raise RunDirLocked(f"{self.run_dir} is in use by another run ({_describe(holder)}); wait for it "
                                   f"to finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            os.unlink(self.run_dir / LOCK_FILE)
            os.rmdir(self.run_dir)
        os.close(self._fd)  # releases the flock
        self._fd = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
