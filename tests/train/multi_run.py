"""Several `tpa` command lines in one torchrun launch: each rank runs them in order, in one process group.
Starting the ranks (importing torch and transformers) costs far more than training the tiny models, so tests
that compare several runs with one process launch once (:func:`launch`); the ranks run this module,
``python -m torch.distributed.run ... -m train.multi_run RUNS.json``, RUNS.json mapping a name to the
arguments of :func:`tpa.cli.main`.

Rank 0 records each finished run's exit status in ``RUNS.status.json``; a run that raises stops the launch
(its traceback is in the launch's log) and the runs after it have no status. What a run prints goes to
``NAME.rankR.out`` next to RUNS.json (:meth:`Launch.stdout`: all ranks' output, as one launch's stdout)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from _helpers import REPO, subprocess_env


@dataclass
class Launch:
    folder: Path
    status: dict[str, int]  # run name -> exit status of `tpa.cli.main`, for the runs that finished
    log: str  # the end of the launch's output, for failure messages

    def check(self, name: str) -> None:
        assert self.status.get(name) == 0, f"run {name!r}: status {self.status.get(name)}\n{self.log}"

    def stdout(self, name: str) -> str:
        """What run ``name`` printed, rank 0's output first."""
        return "".join(p.read_text() for p in sorted(self.folder.glob(f"{name}.rank*.out")))


def _write_runs(runs: dict[str, list[str]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    runs_file = folder / "runs.json"
    runs_file.write_text(json.dumps({name: [str(a) for a in argv] for name, argv in runs.items()}))
    return runs_file


def _status(runs_file: Path) -> dict[str, int]:
    status_file = runs_file.with_suffix(".status.json")
    return json.loads(status_file.read_text()) if status_file.is_file() else {}


def launch(runs: dict[str, list[str]], folder: Path, nproc: int = 2, timeout: float = 600) -> Launch:
    """``runs`` (name -> `tpa` arguments) in one ``torchrun --standalone`` launch of ``nproc`` CPU ranks."""
    runs_file = _write_runs(runs, folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "train.multi_run", str(runs_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)
    log = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return Launch(folder, _status(runs_file), log)


def launch_two_nodes(runs: dict[str, list[str]], folder: Path, timeout: float = 600) -> Launch:
    """``runs`` on two simulated nodes: two torchrun launchers of one process each (static rendezvous on
    127.0.0.1), node_rank 0 and 1 giving RANK 0 and 1 with LOCAL_RANK 0 on both."""
    runs_file = _write_runs(runs, folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "-m", "train.multi_run", str(runs_file)]
            out = open(folder / f"node{node}.log", "w")
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=out,
                                           stderr=subprocess.STDOUT), out))
        codes = [p.wait(timeout=timeout) for p, _ in procs]
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
    log = "\n".join(f"--- node {n} (exit {c}):\n" + (folder / f"node{n}.log").read_text()[-4000:]
                    for n, c in enumerate(codes))
    return Launch(folder, _status(runs_file), log)


def run_all(runs_file: Path) -> None:
    """What each rank runs: every command line of ``runs_file`` in order, in one process group."""
    import torch.distributed as dist

    from tpa.cli import main
    from tpa.train.parallel import setup_distributed, teardown_distributed

    runs = json.loads(runs_file.read_text())
    status: dict[str, int] = {}
    world = setup_distributed("cpu")  # `tpa train` keeps (and leaves) a process group it did not create
    try:
        for name, argv in runs.items():
            print(f"=== {name}: tpa {' '.join(argv)}", flush=True)
            with open(runs_file.parent / f"{name}.rank{world.rank}.out", "w") as out, contextlib.redirect_stdout(out):
                status[name] = main(argv)
            if world.is_main:
                runs_file.with_suffix(".status.json").write_text(json.dumps(status))
            dist.barrier()
    finally:
        teardown_distributed()


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))
