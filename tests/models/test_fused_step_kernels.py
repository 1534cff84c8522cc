"""A static cache's one-token step adds each sublayer's output to the residual stream in the next
RMSNorm's launch (tpa.ops.add_norm) and runs SwiGLU's activation in one (tpa.ops.swiglu): 2L + 1 and L
launches per step for L blocks, for every attention type, with the unfused step's numbers. Other
calls (prefill, dynamic caches, hidden states requested, ``decode_impl="reference"``) keep the
separate ops.

``decode_impl="kernel"`` runs the Triton kernels (the interpreter on the CPU: ``TRITON_INTERPRET=1``
from ``tests/conftest.py``); float32, batch 3 with left-padded prompts.
"""

from __future__ import annotations

import pytest
import torch

import tpa
import tpa.ops.add_norm as add_norm_module
import tpa.ops.swiglu as swiglu_module
from tests.ops.kernels import KERNELS_RUNNABLE
from tpa import T6Cache, T6Config, T6ForCausalLM

pytestmark = pytest.mark.skipif(not KERNELS_RUNNABLE, reason="needs Triton kernels (GPU, or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT = 6


def _model(attention_type):
    torch.manual_seed(0)
    config = T6Config.from_preset("tiny", attention_type, num_hidden_layers=3)
    return T6ForCausalLM(config).to(DEVICE).eval()


def _inputs(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return ids, mask


def _decode(model, impl, static=True, **options):
    model.config.decode_impl = impl
    ids, mask = _inputs(model)
    cache = T6Cache.for_model(model, 3, capacity=16, static=static, **({"cuda_graphs": False} if static else {}))
    steps, hidden = [], []
    with torch.no_grad():
        model(input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], cache=cache, use_cache=True)
        for i in range(PROMPT, ids.shape[1]):
            out = model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache, use_cache=True,
                        **options)
            steps.append(out.logits[:, -1])
            hidden.append(out.hidden_states)
    return torch.stack(steps, 1), hidden


@pytest.fixture
def launches(monkeypatch):
    counted = []
    for module, kind in ((add_norm_module, "norm"), (swiglu_module, "swiglu")):
        launch = module._launch
        monkeypatch.setattr(module, "_launch", lambda *a, launch=launch, kind=kind: (counted.append(kind), launch(*a))[1])
    return counted


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_static_steps_fuse_adds_and_norms(attention_type, launches):
    model = _model(attention_type)
    fused, _ = _decode(model, "kernel")
    steps = _inputs(model)[0].shape[1] - PROMPT
    layers = model.config.num_hidden_layers
    assert launches.count("norm") == (2 * layers + 1) * steps and launches.count("swiglu") == layers * steps
    reference, _ = _decode(model, "reference")
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl, static, options", [
    ("reference", True, {}),
    ("kernel", False, {}),
    ("kernel", True, {"output_hidden_states": True}),
])
def test_other_calls_keep_separate_adds_and_norms(impl, static, options, launches):
    model = _model("tpa")
    logits, hidden = _decode(model, impl, static, **options)
    assert not launches
    if options:
        assert len(hidden[0]) == model.config.num_hidden_layers + 1


def test_fused_and_unfused_static_steps_agree_exactly_with_the_twin(monkeypatch):
    """With the twin (torch ops) behind the fused calls, a fused step is the unfused step, bit for bit."""
    model = _model("tpa")
    monkeypatch.setattr(add_norm_module, "_use_triton", lambda backend, x, weight: False)
    monkeypatch.setattr(swiglu_module, "_use_triton", lambda backend, gate_up: False)
    fused, _ = _decode(model, "auto")
    unfused, _ = _decode(model, "auto", output_hidden_states=True)
    assert torch.equal(fused, unfused)
