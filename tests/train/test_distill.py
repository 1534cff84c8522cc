"""tpa train --init-from / --distill-from: the KL to the teacher goes down, --init-from starts from the
given weights, resume is exact, DDP and FSDP2 (two CPU ranks) reproduce one process, bad input is clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import multi_run
from train.conftest import read_metrics, tiny_config, train_losses
from tpa.convert.llama import ConvertOptions, convert
from tpa.train.distill import distill_kl
from tpa.train.trainer import train

STEPS = 6
DISTILL = dict(global_batch_size=8, micro_batch_size=2, max_steps=STEPS, eval_every=3, checkpoint_every=3,
               distill_weight=0.5, distill_temperature=2.0)


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory) -> Path:
    """A tiny MHA model trained for 20 steps (the teacher), exported."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    result = train(tiny_config(data_dir, run, attention_type="mha"))
    return result.export_dir


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    """The teacher converted to TPA-KVonly at ranks 1/1 (cache 2(H+D) vs the teacher's 2HD)."""
    out = tmp_path_factory.mktemp("student") / "tpa"
    convert(teacher, out, ConvertOptions(k_rank=1, v_rank=1, calibration_tokens=2048, calibration_seq_len=32))
    return out


def _val_kl(student_dir: Path, teacher_dir: Path, data_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    from tpa.data.loader import TokenShards, val_batch

    rows = val_batch(TokenShards(data_dir, "val"), 32, range(16))
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(student_dir).eval()(input_ids=rows[:, :-1]).logits
        t = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()(input_ids=rows[:, :-1]).logits
    return distill_kl(s, t).item()


def _val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None}


def test_distillation_lowers_the_kl_to_the_teacher(student, teacher, data_dir, tmp_path):
    """20 steps of distillation halve the KL to the teacher; the same steps without the KL term do not."""
    before = _val_kl(student, teacher, data_dir)
    kl = {}
    for weight in (10.0, 0.0):
        run = tmp_path / f"run{weight}"
        result = train(tiny_config(data_dir, run, init_from=str(student), distill_from=str(teacher), max_steps=20,
                                   lr=3e-4, min_lr=3e-5, distill_weight=weight))
        kl[weight] = _val_kl(result.export_dir, teacher, data_dir)
        losses = list(train_losses(run).values())
        assert sum(losses[-5:]) < sum(losses[:5])
    assert kl[10.0] < 0.5 * before and kl[10.0] < 0.5 * kl[0.0], (before, kl)
    # the export is a TPA-KVonly model of the student's ranks
    cfg = json.loads((result.export_dir / "config.json").read_text())
    assert cfg["attention_type"] == "tpa_kvonly" and cfg["k_rank"] == cfg["v_rank"] == 1


def test_init_from_starts_at_the_given_weights(teacher, data_dir, tmp_path):
    """An exact conversion of the teacher starts at the teacher's validation loss (step 0)."""
    exact = tmp_path / "exact"
    convert(teacher, exact, ConvertOptions(exact=True, calibration_tokens=256, calibration_seq_len=32))
    teacher_val = _val_losses(teacher.parent)[20]
    run = tmp_path / "run"
    train(tiny_config(data_dir, run, init_from=str(exact), max_steps=1, eval_every=1))
    assert _val_losses(run)[0] == pytest.approx(teacher_val, rel=1e-5)


@pytest.fixture(scope="module")
def distill_run(student, teacher, data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("distill") / "run"
    train(tiny_config(data_dir, run, init_from=str(student), distill_from=str(teacher), **DISTILL))
    return run


def test_distillation_resumes_exactly(distill_run, student, teacher, data_dir, tmp_path):
    run = tmp_path / "run"
    common = dict(init_from=str(student), distill_from=str(teacher), **DISTILL)
    assert train(tiny_config(data_dir, run, halt_at_step=3, **common)).stopped == "halted"
    train(tiny_config(data_dir, run, resume=True, **common))
    assert train_losses(run) == train_losses(distill_run)
    assert _val_losses(run) == _val_losses(distill_run)
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(distill_run / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming with other distillation settings is refused
    with pytest.raises(ValueError, match="distill_weight"):
        train(tiny_config(data_dir, run, resume=True, **{**common, "distill_weight": 0.1, "max_steps": STEPS + 2}))



@pytest.fixture(scope="module")
def two_rank_distill_runs(student, teacher, data_dir, tmp_path_factory) -> tuple[Path, multi_run.Launch]:
    """Distillation under DDP and under FSDP2, in one torchrun launch of two ranks (train.multi_run)."""
    folder = tmp_path_factory.mktemp("two_rank_distill")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        args = ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir", str(folder / parallel),
                "--parallel", parallel, "--seq-len", "32", "--warmup-steps", "4", "--lr", "3e-3", "--min-lr", "3e-4",
                "--eval-sequences", "16", "--log-every", "1", "--no-tensorboard", "--progress", "false",
                "--device", "cpu", "--init-from", str(student), "--distill-from", str(teacher)]
        runs[parallel] = args + [a for k, v in DISTILL.items() for a in ("--" + k.replace("_", "-"), str(v))]
    return folder, multi_run.launch(runs, folder)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_distil_like_one_process(parallel, two_rank_distill_runs, distill_run):
    folder, launched = two_rank_distill_runs
    launched.check(parallel)
    got, want = train_losses(folder / parallel), train_losses(distill_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got[step], want[step])


def test_bad_distillation_input(student, teacher, data_dir, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        train(tiny_config(data_dir, tmp_path / "a", init_from=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="no config.json"):
        train(tiny_config(data_dir, tmp_path / "b", init_from=str(student), distill_from=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="distill_temperature > 0"):
        tiny_config(data_dir, tmp_path / "c", distill_from=str(teacher), distill_temperature=0.0)
    with pytest.raises(ValueError, match="init_from gives the architecture"):
        tiny_config(data_dir, tmp_path / "d", init_from=str(student), model_overrides={"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="seq_len=2048 exceeds"):
        train(tiny_config(data_dir, tmp_path / "e", init_from=str(student), seq_len=2048))
    # a teacher of another vocabulary
    from tpa import T6Config, T6ForCausalLM

    other = tmp_path / "other"
    T6ForCausalLM(T6Config.from_preset("tiny", "mha", vocab_size=384, num_hidden_layers=1)).save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary has 384 tokens"):
        train(tiny_config(data_dir, tmp_path / "f", init_from=str(student), distill_from=str(other)))


def test_distill_kl_is_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, log_q = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    ref = (p * (p.log() - log_q)).sum(-1).mean() * 4
    assert distill_kl(s, t, 2.0).item() == pytest.approx(ref.item(), rel=1e-6)
    assert distill_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
