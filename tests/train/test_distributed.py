"""torchrun --nproc_per_node 2 on CPUs (gloo): DDP and FSDP2 reproduce a one-process run with the same
global batch, and an FSDP2 (DCP) checkpoint resumes under torchrun and loads in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.conftest import read_metrics, tiny_config, train_losses
from tpa.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
COMMON = dict(global_batch_size=8, micro_batch_size=2, max_steps=STEPS, eval_every=3, checkpoint_every=3)


def _torchrun(data_dir: Path, run: Path, parallel: str, *extra: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tpa.cli",
           "train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(run), "--parallel", parallel,
           "--seq-len", "32", "--warmup-steps", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--eval-sequences", "16",
           "--log-every", "1", "--no-tensorboard", "--progress", "false", "--device", "cpu",
           *[str(a) for kv in COMMON.items() for a in ("--" + kv[0].replace("_", "-"), kv[1])], *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    train(tiny_config(data_dir, run, **COMMON))
    return run


def _compare(run: Path, ref: Path, rtol: float) -> None:
    got, want = train_losses(run), train_losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rtol, abs=0), (step, got[step], want[step])
    vals = [(r["step"], r["val_loss"]) for r in read_metrics(run) if r.get("val_loss") is not None]
    ref_vals = [(r["step"], r["val_loss"]) for r in read_metrics(ref) if r.get("val_loss") is not None]
    assert [s for s, _ in vals] == [s for s, _ in ref_vals] == [0, 3, 6]
    for (_, a), (_, b) in zip(vals, ref_vals):
        assert a == pytest.approx(b, rel=rtol, abs=0)
    wa, wb = load_file(str(run / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(parallel, single_run, data_dir, tmp_path):
    run = tmp_path / "run"
    _torchrun(data_dir, run, parallel)
    _compare(run, single_run, rtol=1e-5)


def test_fsdp_checkpoint_resumes_and_reshards(single_run, data_dir, tmp_path):
    """An FSDP2 run halted at step 3 resumes under torchrun, and its DCP checkpoint loads in one process."""
    run = tmp_path / "run"
    _torchrun(data_dir, run, "fsdp", "--halt-at-step", "3")
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000003" / "rng").iterdir()) == \
        ["rank_00000.pt", "rank_00001.pt"]
    _torchrun(data_dir, run, "fsdp", "--resume")
    _compare(run, single_run, rtol=1e-5)
    # the sharded checkpoint at step 3 continues in a single process
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    os.symlink(run / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    result = train(tiny_config(data_dir, one, resume=True, **COMMON))
    assert result.step == STEPS
    got, want = train_losses(one), train_losses(single_run)
    for step in range(4, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0)
