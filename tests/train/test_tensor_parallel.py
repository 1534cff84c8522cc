"""`tpa train --tp` under torchrun on CPUs (gloo): TP=2 reproduces one process's losses, validation losses and
exported weights; TP composes with FSDP2 on the (dp, tp) mesh (1 x 2, and 2 x 2 on four ranks); a TP checkpoint
resumes under TP and continues in one process (from 1 x 2 and from 2 x 2); `tpa generate --tp 2` writes the
one-process text. The two-rank runs start in one launch (train.multi_run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import REPO, subprocess_env
from train import multi_run
from train.conftest import tiny_config, train_losses
from train.test_distributed import COMMON, STEPS, _cli_args, _train_args
from tpa.train.trainer import train

# tiny TPA has 5 heads; 4 split over 2 ranks
OVERRIDES = {"num_attention_heads": 4}
TPA = ("--attention-type", "tpa", "--model-overrides", json.dumps(OVERRIDES))


def _compare(run: Path, ref: Path) -> None:
    """Training and validation losses within 1e-5 (relative) of one process, exported weights within 1e-4:
    TP sums the partial products of a projection in another order, and Adam's update g / (sqrt(v) + eps)
    turns the rounding of a near-zero gradient (a token seen once) into a larger step than the same
    relative error elsewhere (DDP, which sums whole gradients, matches to 1e-5)."""
    import torch
    from safetensors.torch import load_file

    from train.conftest import read_metrics

    got, want = train_losses(run), train_losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got[step], want[step])
    vals = [(r["step"], r["val_loss"]) for r in read_metrics(run) if r.get("val_loss") is not None]
    ref_vals = [(r["step"], r["val_loss"]) for r in read_metrics(ref) if r.get("val_loss") is not None]
    assert [s for s, _ in vals] == [s for s, _ in ref_vals] == [0, 3, 6]
    for (_, a), (_, b) in zip(vals, ref_vals):
        assert a == pytest.approx(b, rel=1e-5, abs=0)
    wa, wb = load_file(str(run / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def single_tpa_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single_tpa") / "run"
    train(tiny_config(data_dir, run, attention_type="tpa", model_overrides=OVERRIDES, **COMMON))
    return run


GENERATE = ["generate", "--prompt", "the", "--max-new-tokens", "12", "--device", "cpu", "--greedy"]


@pytest.fixture(scope="module")
def tp_runs(single_tpa_run, data_dir, tmp_path_factory) -> tuple[Path, multi_run.Launch]:
    """The two-rank runs, in one torchrun launch (train.multi_run): TP=2; TP=2 inside FSDP2 on a 1 x 2
    (dp, tp) mesh with the shared rows of the fused projections sharded too (--tp-shard-shared), halted at
    step 3; `tpa generate --tp 2` of the one-process model."""
    folder = tmp_path_factory.mktemp("tp_runs")
    runs = {"tp2": _cli_args(data_dir, folder / "tp2", "auto", *TPA, "--tp", "2"),
            "tp2-fsdp-halted": _cli_args(data_dir, folder / "tp2-fsdp-halted", "fsdp", *TPA, "--tp", "2",
                                         "--tp-shard-shared", "--halt-at-step", "3"),
            "generate": [*GENERATE, "--model", str(single_tpa_run / "final"), "--tp", "2"]}
    return folder, multi_run.launch(runs, folder)


def test_tp2_matches_one_process(tp_runs, single_tpa_run):
    folder, launched = tp_runs
    launched.check("tp2")
    run = folder / "tp2"
    _compare(run, single_tpa_run)
    info = json.loads((run / "run_info.jsonl").read_text().splitlines()[0])
    assert info["parallel"] == "none" and info["world_size"] == 2


def test_tp2_inside_fsdp2_on_four_ranks_matches_one_process(single_tpa_run, data_dir, tmp_path):
    """A (dp, tp) = (2, 2) mesh, FSDP2 over the two replicas of two TP ranks each (``--parallel auto`` picks
    FSDP there), whose step-3 checkpoint (fused projections sharded over both mesh dimensions) continues in
    one process."""
    run = tmp_path / "run"
    _torchrun(4, _train_args(data_dir, run, "auto", *TPA, "--tp", "2"))
    _compare(run, single_tpa_run)
    info = json.loads((run / "run_info.jsonl").read_text().splitlines()[0])
    assert info["parallel"] == "fsdp" and info["world_size"] == 4
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    os.symlink(run / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    train(tiny_config(data_dir, one, resume=True, attention_type="tpa", model_overrides=OVERRIDES, **COMMON))
    got, want = train_losses(one), train_losses(single_tpa_run)
    for step in range(4, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0)


def test_tp_with_fsdp_checkpoint_resumes_and_loads_in_one_process(tp_runs, single_tpa_run, data_dir):
    """TP=2 inside FSDP2 (a 1 x 2 (dp, tp) mesh) halted at step 3, resumed under TP; its step-3 checkpoint
    also continues in one process without TP. The first part holds the shared rows of the fused projections
    sharded too (--tp-shard-shared), the resumed one replicated: the checkpoint layout is the same."""
    folder, launched = tp_runs
    launched.check("tp2-fsdp-halted")
    run = folder / "tp2-fsdp-halted"
    _torchrun(2, _train_args(data_dir, run, "fsdp", *TPA, "--tp", "2", "--resume"))
    _compare(run, single_tpa_run)
    one = folder / "one"
    (one / "checkpoints").mkdir(parents=True)
    os.symlink(run / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    result = train(tiny_config(data_dir, one, resume=True, attention_type="tpa", model_overrides=OVERRIDES,
                               **COMMON))
    assert result.step == STEPS
    got, want = train_losses(one), train_losses(single_tpa_run)
    for step in range(4, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0)


def test_generate_tp2_writes_the_one_process_text(tp_runs, single_tpa_run, capsys):
    """`tpa generate --tp 2` (two ranks, in tp_runs) prints what one process prints (here, in this one)."""
    from tpa.cli import main

    capsys.readouterr()
    assert main([*GENERATE, "--model", str(single_tpa_run / "final")]) == 0
    one = capsys.readouterr().out
    _, launched = tp_runs
    launched.check("generate")
    assert launched.stdout("generate") == one and one.strip()
