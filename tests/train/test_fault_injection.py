"""Fault injection: the trainer killed at random points, corrupt checkpoint files, two trainers on one
run directory, a full disk. The trainers to kill run in processes forked from a server that has imported
torch and transformers (_helpers.ForkedPython), so they start in a fraction of a second. After each fault a resumed run must equal an uninterrupted one bit for
bit (fp32 on a CPU is deterministic), or the fault must be refused with a clear message.

CI runs a few seeds; ``python -m pytest -m slow tests/train/test_fault_injection.py`` runs a longer loop.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import ForkedPython
from train.conftest import read_metrics, tiny_config, train_losses
from tpa.train import checkpoint as ckpt
from tpa.train.trainer import train

STEPS = dict(max_steps=12, checkpoint_every=2, eval_every=6, keep_checkpoints=2)



@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fault_ref") / "run"
    train(tiny_config(data_dir, run, **STEPS))
    return run


def _assert_equal_runs(run: Path, reference: Path) -> None:
    assert train_losses(run) == train_losses(reference)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == sorted(set(steps)), steps  # every step once (the logs were truncated on resume)
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(reference / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainer_script(data_dir: Path, run: Path) -> str:
    return (f"from pathlib import Path\nfrom train.conftest import tiny_config\nfrom tpa.train.trainer import train\n"
            f"train(tiny_config(Path({str(data_dir)!r}), Path({str(run)!r}), resume=True, **{STEPS!r}))\n")


def _kill_and_resume(data_dir: Path, run: Path, seed: int, kills: int) -> list[str]:
    """Start the trainer, SIGKILL it at a random moment after it has logged a random number of steps,
    ``kills`` times; then let it finish. Returns where each kill landed (for the failure message)."""
    rng = random.Random(seed)
    landed = []
    for kill in range(kills):
        proc = ForkedPython(_trainer_script(data_dir, run), run.parent / f"trainer-{kill}")
        logged = len(read_metrics(run)) if (run / "metrics.jsonl").is_file() else 0
        target = logged + rng.randint(1, 4)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        names = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
        landed.append(f"rc={proc.returncode} after {target} records: {names}")
        if proc.returncode == 0:
            break
    result = train(tiny_config(data_dir, run, resume=True, **STEPS))
    assert result.stopped == "finished" and result.step == STEPS["max_steps"], landed
    return landed


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_random_points_resumes_bitwise(reference, data_dir, tmp_path, seed):
    run = tmp_path / "run"
    landed = _kill_and_resume(data_dir, run, seed, kills=2)
    _assert_equal_runs(run, reference)
    assert not list((run / "checkpoints").glob(".*")), landed  # no leftovers


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 8))
def test_killed_at_random_points_resumes_bitwise_long(reference, data_dir, tmp_path, seed):
    run = tmp_path / "run"
    landed = _kill_and_resume(data_dir, run, seed, kills=6)
    _assert_equal_runs(run, reference)


def test_killed_while_rotating_checkpoints(reference, data_dir, tmp_path):
    """A kill between hiding an old checkpoint and deleting it leaves only a hidden folder, removed later."""
    run = tmp_path / "run"
    script = ("import os, signal, shutil\nfrom tpa.train import checkpoint\nreal = shutil.rmtree\n"
              "def die(path, *a, **k):\n"
              "    if str(path).endswith('.step_00000002.old'):\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(path, *a, **k)\n"
              "checkpoint.shutil.rmtree = die\n") + _trainer_script(data_dir, run)
    proc = ForkedPython(script, tmp_path / "trainer")
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr()[-2000:]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_00000002.old", "step_00000004", "step_00000006"]
    train(tiny_config(data_dir, run, resume=True, **STEPS))
    assert not (ckpts / ".step_00000002.old").exists()
    _assert_equal_runs(run, reference)


# ---- corrupt checkpoint files: the newest is refused, the run resumes from the one before


@pytest.fixture(scope="module")
def halted(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fault_halted") / "run"
    train(tiny_config(data_dir, run, halt_at_step=8, **STEPS))
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [6, 8]
    return run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "distcp truncated": ("state/__0_0.distcp", _truncate),
    "distcp bytes overwritten": ("state/__0_0.distcp", _flip),
    "dcp metadata truncated": ("state/.metadata", _truncate),
    "trainer state truncated": ("trainer.json", _truncate),
    "rng state overwritten": ("rng/rank_00000.safetensors", _flip),
    "manifest garbage": ("manifest.json", lambda p: p.write_text("{not json")),
    "file missing": ("rng/rank_00000.safetensors", Path.unlink),
    "file added": ("state/extra.distcp", lambda p: p.write_bytes(b"\0" * 16)),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(halted, reference, data_dir, tmp_path, kind, capsys):
    run = tmp_path / "run"
    shutil.copytree(halted, run)
    rel, damage = CORRUPTIONS[kind]
    damage(run / "checkpoints" / "step_00000008" / rel)
    capsys.readouterr()
    result = train(tiny_config(data_dir, run, resume=True, **STEPS))
    err = capsys.readouterr().err
    assert "checkpoint step_00000008 is corrupt" in err and "resuming from step_00000006" in err, err
    assert result.step == 12 and (run / "checkpoints" / "step_00000008.corrupt").is_dir()
    _assert_equal_runs(run, reference)


def test_every_checkpoint_corrupt_stops_with_a_message(halted, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(halted, run)
    for step in (6, 8):
        _flip(run / "checkpoints" / f"step_{step:08d}" / "state" / "__0_0.distcp")
    with pytest.raises(ckpt.CorruptCheckpoint, match="no checkpoint .* verifies"):
        train(tiny_config(data_dir, run, resume=True, **STEPS))


# ---- two trainers at once


def test_two_trainers_on_one_run_directory(reference, data_dir, tmp_path, capsys):
    """The first trainer (a process) waits at its first checkpoint until the second (`tpa train` in this
    process) has tried, and been refused."""
    from tpa.cli import main

    run = tmp_path / "run"
    release = tmp_path / "release"
    script = ("import time\nfrom pathlib import Path\nfrom tpa.train import checkpoint\n"
              "def wait(tmp):\n"
              f"    deadline = time.time() + 240\n"
              f"    while not Path({str(release)!r}).exists() and time.time() < deadline:\n"
              "        time.sleep(0.05)\n"
              "checkpoint._before_publish = wait\n") + _trainer_script(data_dir, run)
    first = ForkedPython(script, tmp_path / "first")
    deadline = time.time() + 180
    while not list(run.glob("checkpoints/.step_*.tmp/manifest.json")) and time.time() < deadline \
            and first.poll() is None:
        time.sleep(0.05)
    cli = ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir",
           str(run), "--resume", "--seq-len", "32", "--global-batch-size", "8", "--micro-batch-size", "4",
           "--max-steps", "12", "--no-tensorboard"]
    capsys.readouterr()
    try:
        second = main(cli)
    finally:
        release.write_text("go")
    second_err = capsys.readouterr().err
    assert first.wait(timeout=300) == 0, first.stderr()[-2000:]
    assert second == 2 and f"in use by another run (process {first.pid} on" in second_err, second_err
    _assert_equal_runs(run, reference)


# ---- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs (room for one tiny checkpoint of ~11 MB, not two); skipped where it cannot be mounted."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    for prefix in ([], ["sudo", "-n"]):
        try:
            done = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            break
    else:
        pytest.skip("cannot mount a small tmpfs here (needs Linux and root or passwordless sudo)")
    try:
        yield mount
    finally:
        subprocess.run([*prefix, "umount", str(mount)], capture_output=True, timeout=30)


def test_a_full_disk_keeps_the_previous_checkpoint(small_disk, data_dir, tmp_path):
    run = small_disk / "run"
    cli = ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir",
           str(run), "--seq-len", "32", "--global-batch-size", "8", "--micro-batch-size", "4", "--max-steps", "12",
           "--checkpoint-every", "2", "--eval-every", "6", "--no-tensorboard", "--progress", "false"]
    proc = ForkedPython.cli(cli, tmp_path / "trainer")  # its output beside the small disk, not on it
    assert proc.wait(timeout=300) == 1, proc.stderr()[-2000:]
    stderr = proc.stderr()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr and len(errors) == 1, stderr
    assert "could not write checkpoint step_00000004" in errors[0] and "MB free" in errors[0], errors
    [(step, path)] = ckpt.list_checkpoints(run / "checkpoints")
    ckpt.verify_checkpoint(path)
    assert ckpt.find_resumable(run / "checkpoints") == path and step == 2
