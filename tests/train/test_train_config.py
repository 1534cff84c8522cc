"""Training configuration: presets, YAML, overrides, --help, the paper's recipe, the schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tpa.train.config import TrainConfig, build_config
from tpa.train.trainer import cosine_lr_factor


def test_paper_recipes():
    """Appendix H.1 and Table 9 of arXiv 2501.06425; medium's peak rate is that of its reported runs
    (6e-4: Appendix H.3 and Table 14; H.1's 3e-4 is H.3's learning-rate ablation)."""
    expected = {"small": (6e-4, 3e-5, 24), "medium": (6e-4, 6e-5, 20), "large": (2e-4, 1e-5, 15), "xl": (1e-4, 1e-5, 6)}
    for preset, (lr, min_lr, micro) in expected.items():
        cfg = build_config(None, {"preset": preset})
        assert (cfg.lr, cfg.min_lr, cfg.micro_batch_size) == (lr, min_lr, micro)
        assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
        assert (cfg.warmup_steps, cfg.global_batch_size, cfg.seq_len) == (2000, 480, 1024)


def test_precedence_preset_yaml_cli(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: small\nlr: 1.0e-4\nmicro-batch-size: 12\ncompile: true\n"
                                       "model_overrides: {num_hidden_layers: 2}\n")
    cfg = build_config(str(tmp_path / "run.yaml"), {"micro_batch_size": "8", "attention_type": "mha"})
    assert cfg.preset == "small" and cfg.min_lr == 3e-5  # from the preset
    assert cfg.lr == 1e-4 and cfg.compile is True and cfg.model_overrides == {"num_hidden_layers": 2}  # YAML
    assert cfg.micro_batch_size == 8 and cfg.attention_type == "mha"  # command line
    assert build_config(None, {"preset": "tiny", "halt_at_step": "none"}).halt_at_step is None
    assert build_config(None, {"model_overrides": '{"head_dim": 16}'}).model_overrides == {"head_dim": 16}


@pytest.mark.parametrize("overrides, message", [
    ({"nonsense": 1}, "unknown config field 'nonsense'"),
    ({"lr": "fast"}, "lr: cannot read 'fast' as float"),
    ({"max_steps": "1.5"}, "max_steps: cannot read"),
    ({"compile": "maybe"}, "compile: cannot read"),
    ({"attention_type": "linear"}, "attention_type must be one of"),
    ({"parallel": "zero3"}, "parallel must be one of"),
    ({"min_lr": 1.0}, "min_lr <= lr"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"halt_at_step": 0}, "halt_at_step must be in"),
    ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
    ({"model_overrides": "[1]"}, "model_overrides: cannot read"),
    ({"tp_shard_shared": True}, "tp_shard_shared .* needs tp > 1"),
])
def test_bad_values_have_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(None, overrides)


def test_help_documents_every_field(capsys):
    from tpa.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split())[:30] in text, f.name


def test_cli_print_config_and_errors(tmp_path, capsys):
    import yaml

    from tpa.cli import main

    assert main(["train", "--preset", "medium", "--attention-type", "gqa", "--no-tensorboard", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr"] == 6e-4 and printed["attention_type"] == "gqa" and printed["tensorboard"] is False
    assert main(["train", "--lr", "x"]) == 2
    assert "cannot read 'x' as float" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")]) == 1
    assert "not a prepared data folder" in capsys.readouterr().err


def test_cosine_schedule():
    f = lambda s: cosine_lr_factor(s, warmup=10, max_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_on_matrices_only():
    """The optimizer groups: every linear weight and the (tied) embedding decay; norm weights do not."""
    from tpa import T6Config, T6ForCausalLM
    from tpa.train.trainer import param_groups

    model = T6ForCausalLM(T6Config.from_preset("tiny", "tpa", vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values() if "norm" in n}
    assert "model.embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linear = {n for n in linear if n in names.values()}  # the tied lm_head shares the embedding
    assert linear and linear <= {names[id(p)] for p in decay["params"]}
