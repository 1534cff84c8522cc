"""The T6 model's decoding through the FlashTPA kernel (Triton; interpreted on CPU) equals the
reference path, for TPA and TPA-KVonly, and for GQA and MQA (tpa.ops.grouped_decode)."""

import pytest
import torch

from tests.ops.kernels import needs_cpu_kernels
from tpa import T6Config, T6ForCausalLM
from tpa.models.t6.hf_compat import output_cache

pytest.importorskip("triton")
pytestmark = needs_cpu_kernels  # the models are built on the CPU
VOCAB = 89


@pytest.mark.parametrize("attention_type", ["tpa", "tpa_kvonly", "gqa", "mqa"])
def test_generation_kernel_path_equals_reference_path(attention_type):
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=2,
                               initializer_range=0.2, decode_impl="reference")
    ref_model = T6ForCausalLM(cfg).eval()
    kernel_model = T6ForCausalLM(T6Config.from_dict({**cfg.to_dict(), "decode_impl": "kernel"})).eval()
    kernel_model.load_state_dict(ref_model.state_dict())
    prompts = torch.randint(1, VOCAB, (2, 7))
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ref = ref_model.generate(prompts, **kw)
    out = kernel_model.generate(prompts, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_path_is_taken(monkeypatch):
    """Guard against the test above passing because the kernel was silently skipped."""
    import tpa.layers.tpa as tpa_layer

    calls = []
    original = tpa_layer.tpa_decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    cfg = T6Config.from_preset("tiny", "tpa", vocab_size=VOCAB, num_hidden_layers=1, decode_impl="kernel")
    model = T6ForCausalLM(cfg).eval()
    monkeypatch.setattr(tpa_layer, "tpa_decode", spy)
    out = model(torch.randint(1, VOCAB, (1, 4)), use_cache=True)
    model(torch.randint(1, VOCAB, (1, 1)), cache=output_cache(out), use_cache=True)
    assert calls and all(c == "triton" for c in calls)


@pytest.mark.parametrize("attention_type", ["gqa", "mqa"])
def test_grouped_kernel_path_is_taken(monkeypatch, attention_type):
    """GQA and MQA decode through tpa.ops.grouped_decode when the kernel is asked for."""
    import tpa.layers.mha as mha_layer

    calls = []
    original = mha_layer.grouped_decode

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=1, decode_impl="kernel")
    model = T6ForCausalLM(cfg).eval()
    monkeypatch.setattr(mha_layer, "grouped_decode", spy)
    out = model(torch.randint(1, VOCAB, (1, 4)), use_cache=True)
    model(torch.randint(1, VOCAB, (1, 1)), cache=output_cache(out), use_cache=True)
    assert calls and all(c == "triton" for c in calls)
