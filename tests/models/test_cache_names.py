"""The cache reaches ``forward`` under both of transformers' names, and is used.

transformers 5.24 renamed the cache argument and output field from ``past_key_values`` to ``cache``;
a forward that takes only one of them silently receives the other in ``**kwargs``, attends to
nothing but the new token, and generates garbage. These tests fail on such a model whatever the
installed transformers version.
"""

import logging

import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

import tpa
from tpa import T6Cache, T6Config, T6ForCausalLM
from tpa.models.t6.hf_compat import CACHE_NAME, OTHER_CACHE_NAME, cache_kwargs, output_cache

VOCAB = 97


def tiny(attention_type="tpa"):
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=2,
                               initializer_range=0.2, pad_token_id=0)
    return T6ForCausalLM(cfg).eval()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def hf_warnings():
    """Every warning transformers logs during the test (``warning_once`` memory cleared first)."""
    logging.Logger.warning_once.cache_clear()
    records, root = _Records(), hf_logging.get_logger("transformers")
    root.addHandler(records)
    try:
        yield records.messages
    finally:
        root.removeHandler(records)


def test_cache_name_matches_installed_transformers():
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert CACHE_NAME == ("cache" if (major, minor) >= (5, 24) else "past_key_values")


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_decode_step_uses_the_cache_under_either_name(attention_type, name):
    model = tiny(attention_type)
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = T6Cache.for_model(model, 2)
        model(ids[:, :-1], use_cache=True, **{name: cache})
        step = model(ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
        alone = model(ids[:, -1:]).logits[:, -1]
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(step, alone, rtol=1e-3, atol=1e-3), "the decode step ignored its cache"


def test_both_names_at_once_is_an_error():
    model = tiny()
    cache = T6Cache.for_model(model, 1)
    ids = torch.randint(1, VOCAB, (1, 3))
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=cache, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="not both"):
        model.model(ids, cache=cache, past_key_values=cache, use_cache=True)


def test_outputs_carry_the_cache_under_the_installed_name():
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 3))
    out = model(ids, use_cache=True)
    assert isinstance(out[CACHE_NAME], T6Cache)
    assert isinstance(model.model(ids, use_cache=True)[CACHE_NAME], T6Cache)
    assert OTHER_CACHE_NAME not in out.keys()


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_generate_passes_the_cache_and_warns_nothing(attention_type, hf_warnings, monkeypatch):
    """Every decode step of ``generate()`` gets the cache of the step before, and transformers logs
    no deprecation about cache names on the way."""
    model = tiny(attention_type)
    seen = []
    forward = T6ForCausalLM.forward

    def spy(self, input_ids=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((input_ids.shape[1], None if cache is None else cache.get_seq_length()))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(T6ForCausalLM, "forward", spy)
    ids = torch.randint(1, VOCAB, (2, 6))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert seen == [(6, 0), (1, 6), (1, 7), (1, 8)]
    assert output_cache(out).get_seq_length() == 9
    assert not [m for m in hf_warnings if "deprecated" in m.lower()], hf_warnings


def test_generate_with_a_user_cache_warns_nothing(hf_warnings):
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 6))
    ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    cache = T6Cache.for_model(model, 1)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache, use_cache=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         **cache_kwargs(cache))
    assert torch.equal(out, ref)
    assert not [m for m in hf_warnings if "deprecated" in m.lower()], hf_warnings
