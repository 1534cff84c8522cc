"""tpa.train on one CPU process: learning, export, exact resume, killed checkpoint writes, signals, NaN."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import ForkedPython
from train.conftest import read_metrics, tiny_config, train_losses
from tpa.train import checkpoint as ckpt
from tpa.train.trainer import NonFiniteLoss, train




@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """20 uninterrupted steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    result = train(tiny_config(data_dir, run))
    assert result.stopped == "finished" and result.step == 20
    return run


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_tiny_model_learns_and_exports(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpa  # noqa: F401
    from tpa.data.loader import TokenShards, val_batch
    from tpa.generate import generate_text
    from tpa.train.trainer import lm_loss

    run = tmp_path / "run"
    result = train(tiny_config(data_dir, run, max_steps=40, eval_every=20, tensorboard=True))
    records = read_metrics(run)
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    assert [r["step"] for r in records if r.get("val_loss") is not None] == [0, 20, 40]
    assert vals[-1] < vals[0] - 2.0, vals  # from ~ln(320) = 5.8 to well under 3.8
    assert result.val_loss == vals[-1]
    last = records[-1]
    assert last["tokens"] == 40 * 8 * 32 and last["tokens_per_s"] > 0 and last["memory_gb"] > 0
    assert last["mfu"] is None  # no known peak on a CPU
    # the run directory records what is needed to reproduce the run
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").read_text().startswith("step,tokens,loss")
    info = json.loads((run / "run_info.jsonl").read_text().splitlines()[0])
    assert {"git_revision", "packages", "device", "world_size", "argv"} <= info.keys()
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"] == torch.__version__
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the export loads in transformers and gives the trainer's validation loss
    model = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    tok = AutoTokenizer.from_pretrained(result.export_dir)
    assert type(model).__name__ == "T6ForCausalLM" and len(tok) == 320
    shards = TokenShards(data_dir, "val")
    rows = val_batch(shards, 32, range(16))
    with torch.no_grad():
        loss = sum(lm_loss(model(input_ids=rows[i : i + 4, :-1]).logits, rows[i : i + 4, 1:]).item()
                   for i in range(0, 16, 4)) / 4
    assert loss == pytest.approx(vals[-1], rel=1e-5)
    text = generate_text(str(result.export_dir), "The king", max_new_tokens=12, greedy=True, stream=False)
    assert isinstance(text, str) and text


def test_exact_resume(reference_run, data_dir, tmp_path):
    """10 steps, halt, resume, 10 more == 20 uninterrupted steps: every loss and the final weights."""
    run = tmp_path / "run"
    first = train(tiny_config(data_dir, run, halt_at_step=10))
    assert first.stopped == "halted" and first.step == 10 and first.export_dir is None
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [10]
    second = train(tiny_config(data_dir, run, resume=True))
    assert second.stopped == "finished" and second.step == 20
    ref = train_losses(reference_run)
    got = train_losses(run)
    assert sorted(got) == list(range(1, 21))
    assert got == ref  # exact equality at every step
    ref_val = {r["step"]: r["val_loss"] for r in read_metrics(reference_run) if r.get("val_loss") is not None}
    got_val = {r["step"]: r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None}
    assert got_val == ref_val
    _assert_same_weights(run, reference_run)


def test_killed_checkpoint_write_leaves_previous_one(reference_run, data_dir, tmp_path):
    run = tmp_path / "run"
    script = f"""
import os, signal
from pathlib import Path
from tpa.train import checkpoint
from train.conftest import tiny_config
from tpa.train.trainer import train

def die_half_way(tmp):
    if tmp.name == ".step_00000010.tmp":
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._before_publish = die_half_way
train(tiny_config(Path({str(data_dir)!r}), Path({str(run)!r}), checkpoint_every=5))
"""
    proc = ForkedPython(script, tmp_path / "trainer")
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr()[-3000:]
    half = run / "checkpoints" / ".step_00000010.tmp"
    assert (half / "state").is_dir() and (half / "manifest.json").is_file()  # written, never published
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [5]
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step_00000005"
    # --resume continues from step 5 and reproduces the uninterrupted run
    result = train(tiny_config(data_dir, run, checkpoint_every=5, resume=True))
    assert result.step == 20 and not half.exists()
    resumed_steps = [r["step"] for r in read_metrics(run) if r.get("loss") is not None]
    assert resumed_steps == list(range(1, 21))  # the records of steps 6-10 written before the kill are replaced
    assert train_losses(run) == train_losses(reference_run)
    _assert_same_weights(run, reference_run)


def test_sigterm_writes_a_checkpoint_and_exits_128_plus_the_signal(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = ["train", "--preset", "tiny", "--data-dir", str(data_dir), "--run-dir",
           str(run), "--seq-len", "32", "--global-batch-size", "8", "--micro-batch-size", "4", "--max-steps", "100000",
           "--checkpoint-every", "100000", "--eval-every", "100000", "--log-every", "1", "--no-tensorboard"]
    proc = ForkedPython.cli(cmd, tmp_path / "trainer")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training did not start")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr()[-3000:]  # 143: a scheduler sees it did not finish
    assert "stopped by a signal" in proc.stdout()
    steps = [r["step"] for r in read_metrics(run) if r.get("loss") is not None]
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert [s for s, _ in saved] == [steps[-1]]
    assert not (run / "final").exists()
    # and it resumes from there
    result = train(tiny_config(data_dir, run, max_steps=100000, checkpoint_every=100000, eval_every=100000,
                               halt_at_step=steps[-1] + 2, resume=True))
    assert result.step == steps[-1] + 2


def _poison_loss_from_step(monkeypatch, step: int):
    """Make the training loss NaN from the second micro-batch of ``step`` on (2 micro-batches a step);
    return the real loss function."""
    import tpa.train.trainer as trainer

    real = trainer.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        loss = real(logits, targets)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 2 * step - 1:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "lm_loss", poisoned)
    return real


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import tpa.train.trainer as trainer

    real = _poison_loss_from_step(monkeypatch, 5)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 5.*step_00000004"):
        train(tiny_config(data_dir, run, checkpoint_every=2, keep_checkpoints=5))
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4]
    assert not list((run / "checkpoints").glob(".*tmp")) and not (run / "final").exists()
    monkeypatch.setattr(trainer, "lm_loss", real)
    result = train(tiny_config(data_dir, run, checkpoint_every=2, resume=True))
    assert result.step == 20 and result.stopped == "finished"


def test_deferred_host_reads_match_reading_every_step(reference_run, data_dir, tmp_path):
    """host_sync='deferred' (the loss read every 5 steps here, the fused AdamW) trains as reading it
    every step does (foreach AdamW): the same losses up to the two optimizers' rounding."""
    run = tmp_path / "run"
    result = train(tiny_config(data_dir, run, host_sync="deferred", log_every=5))
    assert result.stopped == "finished" and result.step == 20
    got, ref = train_losses(run), train_losses(reference_run)
    assert sorted(got) == [5, 10, 15, 20]
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), step


def test_deferred_non_finite_loss_skips_the_step_and_stops_at_the_next_read(data_dir, tmp_path, monkeypatch):
    """With deferred reads a NaN at step 5 is found at the read of step 6: the fused AdamW skipped
    step 5's update on the device, no checkpoint is written after it, and the message names step 5."""
    import tpa.train.trainer as trainer

    _poison_loss_from_step(monkeypatch, 5)
    skipped = []
    real_step = trainer._deferred_optimizer_step

    def spy(model, optimizer, loss, *args):
        before = [p.detach().clone() for p in model.parameters()]
        real_step(model, optimizer, loss, *args)
        if not torch.isfinite(loss):
            skipped.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))

    monkeypatch.setattr(trainer, "_deferred_optimizer_step", spy)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 5; the optimizer skipped.*step 6.*step_00000004"):
        train(tiny_config(data_dir, run, checkpoint_every=2, keep_checkpoints=5, host_sync="deferred", log_every=3))
    assert skipped == [True, True]  # steps 5 and 6: parameters untouched
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4]
    assert not (run / "final").exists()


def test_host_sync_choices():
    from tpa.train.config import build_config

    with pytest.raises(ValueError, match="host_sync must be one of"):
        build_config(None, {"preset": "tiny", "host_sync": "never"})
    with pytest.raises(ValueError, match="needs the fused AdamW"):
        build_config(None, {"preset": "tiny", "host_sync": "deferred", "parallel": "fsdp"})


def test_existing_run_needs_resume(reference_run, data_dir):
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(data_dir, reference_run))


def test_resume_refuses_another_architecture(reference_run, data_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints", run / "checkpoints")
    with pytest.raises(ValueError, match=r"another model: attention_type \(checkpoint 'tpa', this run 'mha'\)"):
        train(tiny_config(data_dir, run, resume=True, max_steps=30, attention_type="mha"))


def test_generate_streams_and_matches_a_plain_greedy_loop(reference_run, capsys):
    """`tpa generate` (model.generate with the KV cache) equals argmax decoding by full forwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpa  # noqa: F401
    from tpa.cli import main
    from tpa.generate import generate_text

    model_dir = reference_run / "final"
    assert main(["generate", "--model", str(model_dir), "--prompt", "The king", "--max-new-tokens", "10",
                 "--greedy"]) == 0
    streamed = capsys.readouterr().out
    text = generate_text(str(model_dir), "The king", max_new_tokens=10, greedy=True, stream=False)
    assert streamed.rstrip("\n") == "The king" + text

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[tok.bos_token_id] + tok("The king", add_special_tokens=False).input_ids])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert tok.decode(ids[0, -10:], skip_special_tokens=True) == text

    sampled = [generate_text(str(model_dir), "The", max_new_tokens=10, seed=s, stream=False) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "0"]) == 1
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "40"]) == 1  # past seq_len 32
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--device", "cpu", "--cuda-graphs"]) == 1
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


def test_export_on_request_and_activation_checkpointing(data_dir, tmp_path):
    """--export-only writes the latest checkpoint as a HF directory; activation checkpointing recomputes
    the blocks and leaves every loss unchanged (fp32 on a CPU is deterministic)."""
    plain, recomputed = tmp_path / "plain", tmp_path / "ac"
    train(tiny_config(data_dir, plain, halt_at_step=4, max_steps=8))
    train(tiny_config(data_dir, recomputed, halt_at_step=4, max_steps=8, activation_checkpointing=True))
    assert train_losses(plain) == train_losses(recomputed)
    result = train(tiny_config(data_dir, plain, max_steps=8, resume=True, export_only=True))
    assert result.stopped == "exported" and result.export_dir == plain / "export_step_00000004"
    assert ckpt.latest_checkpoint(plain / "checkpoints").name == "step_00000004"  # no training happened
    from transformers import AutoModelForCausalLM

    import tpa  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(result.export_dir)
    assert model.config.vocab_size == 320
    # the same 4 steps (the warm-up is 4 steps, so max_steps does not change them) ending in a final export
    finished = train(tiny_config(data_dir, tmp_path / "four", max_steps=4))
    wa, wb = load_file(str(result.export_dir / "model.safetensors")), load_file(str(finished.export_dir / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="needs resume"):
        tiny_config(data_dir, plain, export_only=True)
