"""Issue 14's training defects, one test each: pickles, resume settings, the run lock, exit codes,
late failures, stale leftovers, error lines instead of tracebacks, metrics after a resume."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.conftest import read_metrics, tiny_config
from tpa.train import checkpoint as ckpt
from tpa.train.trainer import cosine_lr_factor, train

@pytest.fixture(scope="module")
def halted_run(data_dir, tmp_path_factory):
    """8 of 16 steps with checkpoints at 4 and 8 (a template: tests copy it)."""
    run = tmp_path_factory.mktemp("halted") / "run"
    result = train(tiny_config(data_dir, run, max_steps=16, halt_at_step=8, checkpoint_every=4, eval_every=8))
    assert result.stopped == "halted" and result.step == 8
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


class _Exploit:
    """Unpickling this creates ``marker``: a planted checkpoint file that runs code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- 2. nothing is unpickled


def test_checkpoints_hold_no_pickle(halted_run):
    files = [p for p in (halted_run / "checkpoints").rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in (".pt", ".pth", ".pkl", ".bin")]
    names = {p.relative_to(p.parents[1] if p.parent.name in ("rng", "state") else p.parent).as_posix() for p in files}
    assert {"trainer.json", "manifest.json", "rng/rank_00000.safetensors", "state/.metadata"} <= names


@pytest.mark.parametrize("where", ["trainer.pt", "rng/rank_00000.pt", "state/.metadata"])
def test_a_planted_pickle_is_never_run(halted_run, data_dir, tmp_path, where):
    """A pickle planted in the newest checkpoint (even with its manifest rewritten to match) runs
    nothing: a legacy trainer.pt / rng .pt is read with weights_only=True, DCP's metadata by an
    unpickler that builds only DCP's classes."""
    run = _copy(halted_run, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000008"
    marker = tmp_path / "pwned"
    if where != "state/.metadata":  # an older-format checkpoint: no manifest, trainer.pt
        (newest / "manifest.json").unlink()
        state = json.loads((newest / "trainer.json").read_text())
        (newest / "trainer.json").unlink()
        torch.save(state, newest / "trainer.pt")
    with open(newest / where, "wb") as f:
        pickle.dump(_Exploit(marker), f)
    if where.startswith("rng/"):
        (newest / "rng" / "rank_00000.safetensors").unlink()
    if (newest / "manifest.json").is_file():
        ckpt.write_manifest(newest)  # the attacker rewrote the manifest too
    try:
        result = train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, eval_every=8, resume=True))
    except ckpt.CorruptCheckpoint as err:  # found while loading: the run stops, naming the file
        assert where.split("/")[0] in str(err)
    else:  # found while choosing the checkpoint: the previous one is used, this one moved aside
        assert where == "trainer.pt" and result.step == 16
        assert (run / "checkpoints" / "step_00000008.corrupt" / "trainer.pt").is_file()
    assert not marker.exists()


def test_checkpoints_of_the_older_format_still_resume(halted_run, data_dir, tmp_path):
    """trainer.pt and rng/rank_*.pt (what the trainer wrote before manifests) load with weights_only=True."""
    import random

    import numpy as np

    run = _copy(halted_run, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000008"
    state = json.loads((newest / "trainer.json").read_text())
    for name in ("trainer.json", "manifest.json"):
        (newest / name).unlink()
    torch.save(state, newest / "trainer.pt")
    from safetensors import safe_open

    with safe_open(str(newest / "rng" / "rank_00000.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    ckpt.set_rng_state(tensors, meta)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               newest / "rng" / "rank_00000.pt")
    (newest / "rng" / "rank_00000.safetensors").unlink()
    resumed = train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, eval_every=8, resume=True))
    fresh = train(tiny_config(data_dir, tmp_path / "ref", max_steps=16, checkpoint_every=4, eval_every=8))
    assert resumed.step == 16 and resumed.val_loss == fresh.val_loss


# ---- 3. resume: the command line's optimizer settings win; the whole model config must agree


def test_resume_uses_the_command_lines_optimizer_settings(halted_run, data_dir, tmp_path, capsys):
    import yaml

    from tpa.train.parallel import Dist
    from tpa.train.trainer import Trainer

    run = _copy(halted_run, tmp_path / "run")
    cfg = tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, eval_every=8, resume=True, lr=1e-3,
                      min_lr=1e-4, weight_decay=0.02, beta2=0.99, eps=1e-7)
    trainer = Trainer(cfg, Dist())
    assert "lr 0.003 -> 0.001" in capsys.readouterr().out
    want_lr = 1e-3 * cosine_lr_factor(8, warmup=4, max_steps=16, min_ratio=0.1)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == pytest.approx(want_lr, rel=1e-12)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.99) and decay["eps"] == 1e-7
    assert trainer.scheduler.get_last_lr() == [decay["lr"], no_decay["lr"]]
    trainer.open_run_dir([])
    result = trainer.fit()
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[9]["lr"] == pytest.approx(want_lr, rel=1e-12)  # what the step really used
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 1e-3  # and what config.yaml says
    assert result.step == 16


@pytest.mark.parametrize("override, field", [({"rope_theta": 500.0}, "rope_theta"),
                                             ({"tpa_head_activation": "sigmoid"}, "tpa_head_activation"),
                                             ({"attention_output_gate": True}, "attention_output_gate"),
                                             ({"rms_norm_eps": 1e-5}, "rms_norm_eps")])
def test_resume_refuses_any_other_model_field(halted_run, data_dir, tmp_path, override, field):
    run = _copy(halted_run, tmp_path / "run")
    with pytest.raises(ValueError, match=rf"another model: {field} \(checkpoint"):
        train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, resume=True, model_overrides=override))
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step_00000008"


def test_resume_allows_run_time_model_fields(halted_run, data_dir, tmp_path):
    run = _copy(halted_run, tmp_path / "run")
    result = train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, eval_every=8, resume=True,
                               model_overrides={"decode_impl": "reference", "use_cache": False}, export=False))
    assert result.step == 16


# ---- 4. fsync of the folders before and after the publishing rename


def test_the_checkpoint_folder_is_fsynced_before_it_is_published(data_dir, tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src)))
        return real_rename(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "rename", rename)
    run = tmp_path / "run"
    train(tiny_config(data_dir, run, max_steps=2, checkpoint_every=2, eval_every=2, export=False))
    tmp = str((run / "checkpoints" / ".step_00000002.tmp").resolve())
    publish = events.index(("rename", str(run / "checkpoints" / ".step_00000002.tmp")))
    synced_before = {path for kind, path in events[:publish] if kind == "fsync"}
    assert {tmp, tmp + "/state", tmp + "/rng"} <= synced_before  # the folders, not only the files
    assert ("fsync", str((run / "checkpoints").resolve())) in events[publish:]  # and the parent after the rename


# ---- 5. one trainer per run directory


def test_a_second_trainer_is_refused_naming_the_holder(halted_run, data_dir, tmp_path):
    from tpa.train.runlock import RunDirLocked

    run = _copy(halted_run, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0)\n"
        "os.write(fd, ('{\"host\": \"nodeA\", \"pid\": %d, \"since\": \"then\"}' % os.getpid()).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"in use by another run \(process {holder.pid} on nodeA"):
            train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, resume=True))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


# ---- 8. --halt-at-step at or below the resumed step trains nothing


def test_halt_at_or_below_the_resumed_step_trains_and_rotates_nothing(halted_run, data_dir, tmp_path):
    run = _copy(halted_run, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    for halt in (8, 5):
        result = train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, halt_at_step=halt, resume=True))
        assert result.stopped == "halted" and result.step == 8
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [4, 8]
    assert (run / "metrics.jsonl").read_text() == before


# ---- 9. a data folder without its tokenizer fails at the start


def test_data_without_tokenizer_fails_before_training(data_dir, tmp_path):
    from tpa.data.sources import DataError

    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"tokenizer.*missing"):
        train(tiny_config(broken, run, max_steps=4, checkpoint_every=2))
    assert not (run / "checkpoints").exists()


# ---- 10. leftovers of killed saves and rotations are deleted at the next run (only those)


def test_stale_checkpoint_leftovers_are_removed(halted_run, data_dir, tmp_path, capsys):
    run = _copy(halted_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step_00000004" / "state", ckpts / "step_00000002" / "state")  # rotation cut short
    shutil.copytree(ckpts / "step_00000004", ckpts / ".step_00000012.tmp")  # save cut short
    shutil.copytree(ckpts / "step_00000004", ckpts / ".step_00000001.old")  # deletion cut short
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000003.corrupt")  # evidence: kept
    (ckpts / "notes.txt").write_text("mine")  # not ours: kept
    train(tiny_config(data_dir, run, max_steps=16, checkpoint_every=4, halt_at_step=8, resume=True))
    assert sorted(p.name for p in ckpts.iterdir()) == ["notes.txt", "step_00000003.corrupt", "step_00000004",
                                                       "step_00000008"]
    assert "removed" in capsys.readouterr().out


# ---- 11. error lines, not tracebacks; values validated


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """`tpa ARGS` in this process (an exception escaping main fails the test): exit status and stderr."""
    from tpa.cli import main

    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def _bad_meta(data_dir: Path, tmp_path: Path, kind: str) -> Path:
    bad = tmp_path / f"data_{kind}"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    if kind == "no_val":
        del meta["splits"]["val"]
        (bad / "meta.json").write_text(json.dumps(meta))
    else:
        (bad / "meta.json").write_text("{not json")
    return bad


# bad values given on the command line: (the extra arguments, what the one error line says)
_BAD_VALUES = {
    "device_tpu": (["--device", "tpu"], "device must be"),
    "lr_1e39": (["--lr", "1e39"], "not a usable learning rate"),
    "negative_weight_decay": (["--weight-decay", "-0.1"], "weight_decay must be"),
    "negative_grad_clip": (["--grad-clip", "-1"], "grad_clip must be"),
    "string_bool": (["--model-overrides", '{"attention_output_gate": "false"}'],
                    "attention_output_gate must be true or false"),
    "negative_eps_norm": (["--model-overrides", '{"rms_norm_eps": -1e-6}'], "rms_norm_eps must be a number >= 0"),
    "negative_intermediate": (["--model-overrides", '{"intermediate_size": -4}'],
                              "intermediate_size must be an integer >= 1"),
}


@pytest.mark.parametrize("case", ["yaml", "device_cuda", "meta_no_val", "meta_not_json", "run_dir_under_a_file",
                                  "read_only_run_dir", *_BAD_VALUES])
def test_cli_errors_are_one_line(case, data_dir, tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"),
            "--seq-len", "32", "--global-batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
            "--no-tensorboard", "--progress", "false"]
    expect = None
    if case in _BAD_VALUES:
        extra, expect = _BAD_VALUES[case]
        args += extra
    elif case == "yaml":
        (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
        expect = "bad.yaml is not valid YAML"
    elif case == "device_cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        args += ["--device", "cuda"]
        expect = "CUDA is not available"
    elif case.startswith("meta"):
        bad = _bad_meta(data_dir, tmp_path, "no_val" if case == "meta_no_val" else "not_json")
        args[args.index("--data-dir") + 1] = str(bad)
        expect = f"{bad / 'meta.json'}: no 'val' split" if case == "meta_no_val" else f"{bad / 'meta.json'} is not valid JSON"
    elif case == "run_dir_under_a_file":
        (tmp_path / "file").write_text("x")
        args[args.index("--run-dir") + 1] = str(tmp_path / "file" / "run")
        expect = "cannot write the run directory"
    elif case == "read_only_run_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        args[args.index("--run-dir") + 1] = str(tmp_path / "ro" / "run")
        expect = "cannot write the run directory"
    code, err = _cli(args, capsys)
    assert code == (1 if case.startswith("meta") else 2), err[-2000:]  # data errors: 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], err
