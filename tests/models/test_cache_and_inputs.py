"""Issue 14: a cache built for another model is refused; bad position ids and empty batches too."""

from __future__ import annotations

import pytest
import torch

from tpa import T6Config, T6ForCausalLM
from tpa.models.t6 import T6Cache


def _model(**kw) -> T6ForCausalLM:
    config = T6Config(vocab_size=64, hidden_size=32, num_hidden_layers=kw.pop("layers", 2), num_attention_heads=4,
                      head_dim=8, max_position_embeddings=32, **kw)
    return T6ForCausalLM(config).eval()


@pytest.mark.parametrize("other", [dict(layers=1), dict(attention_type="mha"), dict(q_rank=6, k_rank=3),
                                   dict(attention_type="mla", kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4)])
def test_a_cache_of_another_model_is_refused(other):
    model, foreign = _model(), _model(**other)
    ids = torch.randint(0, 64, (1, 5))
    cache = T6Cache.for_model(foreign, batch_size=1)
    with pytest.raises(ValueError, match="built for another model"):
        model(input_ids=ids, cache=cache, use_cache=True)
    own = T6Cache.for_model(model, batch_size=1)
    with torch.no_grad():
        cached = model(input_ids=ids, cache=own, use_cache=True).logits
        assert torch.allclose(cached, model(input_ids=ids, use_cache=False).logits, atol=1e-5)


def test_position_ids_must_be_non_negative_integers():
    model = _model()
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match=r"position ids must lie in \[0, 32\)"):
        model(input_ids=ids, position_ids=torch.tensor([[-1, 0, 1, 2]]), use_cache=False)
    with pytest.raises(TypeError, match="position_ids must be integer"):
        model(input_ids=ids, position_ids=torch.arange(4.0)[None], use_cache=False)


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="empty batch"):
        _model()(input_ids=torch.zeros(0, 4, dtype=torch.long), use_cache=False)


@pytest.mark.parametrize("field, value, message", [("rms_norm_eps", -1e-6, "rms_norm_eps must be a number >= 0"),
                                                   ("intermediate_size", -4, "intermediate_size must be an integer"),
                                                   ("rope_theta", 0.0, "rope_theta must be a positive"),
                                                   ("attention_output_gate", "false", "must be true or false"),
                                                   ("tie_word_embeddings", "no", "must be true or false")])
def test_config_values_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        T6Config(**{field: value})


def test_generate_says_what_is_missing(tmp_path, capsys):
    from tpa.cli import main

    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--max-new-tokens", "2"]) == 1
    assert f"--model {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--max-new-tokens", "2"]) == 1
    assert "has no config.json" in capsys.readouterr().err
    _model().save_pretrained(tmp_path / "weights_only")
    assert main(["generate", "--model", str(tmp_path / "weights_only"), "--max-new-tokens", "2"]) == 1
    assert "has no tokenizer" in capsys.readouterr().err
