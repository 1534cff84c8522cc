"""A static cache's one-token step writes RoPE and the cache in one launch (tpa.ops.step_write) in
every layer that decodes through the kernel path, and gives the reference path's numbers.

``decode_impl="kernel"`` runs the Triton kernels (the interpreter on the CPU: ``TRITON_INTERPRET=1``
from ``tests/conftest.py``); ``"reference"`` the torch-op path of the layers, which writes the
cache with one scatter per part. Both run on the same prompt and tokens, float32, batch 3 with
padded prompts (ragged lengths); the logits of every step and the cache buffers must agree.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.kernels import KERNELS_RUNNABLE
import tpa.ops.step_write as step_write_module
from tpa import T6Cache, T6Config, T6ForCausalLM

pytestmark = pytest.mark.skipif(not KERNELS_RUNNABLE, reason="needs Triton kernels (GPU, or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = [  # (attention type, overrides, layers that take the fused step)
    ("tpa", {}, "all"),
    ("tpa", {"attention_output_gate": True, "rope_partial_factor": 0.5}, "all"),
    ("tpa", {"tpa_cache_head_multiple": 16, "num_attention_heads": 5, "q_rank": 3, "k_rank": 1, "v_rank": 3}, "all"),
    ("tpa_kvonly", {}, "all"),
    ("tpa", {"tpa_head_activation": "sigmoid"}, "none"),  # activated head factors keep the torch path
    ("mha", {"rope_partial_factor": 0.5}, "all"),
    ("gqa", {"num_attention_heads": 6, "num_key_value_heads": 2}, "all"),
    ("mqa", {}, "all"),
]


def _decode(model, ids, mask, impl):
    model.config.decode_impl = impl
    cache = T6Cache.for_model(model, ids.shape[0], capacity=16, static=True, cuda_graphs=False)
    steps = []
    with torch.no_grad():
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
        for i in range(6, ids.shape[1]):
            out = model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), cache


@pytest.mark.parametrize("attention_type, overrides, fused", CONFIGS)
def test_fused_step_equals_reference(attention_type, overrides, fused, monkeypatch):
    torch.manual_seed(0)
    config = T6Config.from_preset("tiny", attention_type, num_hidden_layers=2, **overrides)
    model = T6ForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(0, config.vocab_size, (3, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: a shorter sequence
    mask[2, :4] = 0
    launches = []
    launch = step_write_module._launch
    monkeypatch.setattr(step_write_module, "_launch", lambda *a: (launches.append(1), launch(*a))[1])
    kernel_logits, kernel_cache = _decode(model, ids, mask, "kernel")
    expected = config.num_hidden_layers * (ids.shape[1] - 6) if fused == "all" else 0
    assert len(launches) == expected
    reference_logits, reference_cache = _decode(model, ids, mask, "reference")
    torch.testing.assert_close(kernel_logits, reference_logits, rtol=1e-4, atol=1e-4)
    for kernel_layer, reference_layer in zip(kernel_cache.kv.layers, reference_cache.kv.layers):
        for name, buf in reference_layer.buffers.items():
            torch.testing.assert_close(kernel_layer.buffers[name], buf, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attention_type", ["tpa", "tpa_kvonly", "gqa", "mha"])
def test_graph_replay_of_fused_step_equals_reference(attention_type):
    """On CUDA: the captured CUDA graph of the fused step (``generate``'s path) against the eager
    reference path, float32, 24 steps past a ragged prompt."""
    torch.manual_seed(1)
    config = T6Config.from_preset("tiny", attention_type)
    model = T6ForCausalLM(config).cuda().eval()
    ids = torch.randint(0, config.vocab_size, (3, 30), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    logits = {}
    for impl, graphs in (("auto", True), ("reference", False)):
        model.config.decode_impl = impl
        cache = T6Cache.for_model(model, 3, capacity=40, static=True, cuda_graphs=graphs)
        steps = []
        with torch.no_grad():
            model(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True)
            for i in range(6, ids.shape[1]):
                out = model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache, use_cache=True)
                steps.append(out.logits[:, -1])
        if graphs:
            assert cache.decode_graph.replays == ids.shape[1] - 6
        logits[impl] = torch.stack(steps, 1)
    torch.testing.assert_close(logits["auto"], logits["reference"], rtol=2e-3, atol=2e-3)
