"""What `tpa train` prints when its output is not a terminal, and the warm-up warning."""

from __future__ import annotations

import re

import pytest

from train.conftest import read_metrics, tiny_config
from tpa.train.trainer import train


def test_one_line_per_log_step_when_output_is_not_a_terminal(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    result = train(tiny_config(data_dir, run, max_steps=6, warmup_steps=2, log_every=2, eval_every=6,
                               checkpoint_every=6, export=False))
    assert result.step == 6
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    logged = [r for r in read_metrics(run) if r["step"] > 0]
    step_lines = [line for line in lines if " | " in line]
    assert [int(re.match(r"step (\d+)/6 \|", line).group(1)) for line in step_lines] == [r["step"] for r in logged]
    assert [2, 4, 6] == [r["step"] for r in logged]
    first = step_lines[0]
    assert f"loss {logged[0]['loss']:.4f}" in first and "tok/s" in first and "lr " in first
    assert "val " in step_lines[-1]  # the evaluation at the last step


def test_warmup_as_long_as_the_run_is_a_warning(data_dir, tmp_path):
    with pytest.warns(UserWarning, match="warmup_steps=20 >= max_steps=20"):
        tiny_config(data_dir, tmp_path / "run", warmup_steps=20)
