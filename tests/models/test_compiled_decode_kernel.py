"""A ``torch.compile``d static decode step through the decode kernel gives the eager step's numbers.

Inside a compiled step the kernel's inputs are views (of the projection's output, of a padded head
factor cache, stride-0 head factors for GQA), and Inductor may hand a kernel a copy laid out otherwise
than the traced view (same stride order, other strides): a padded view's copy made a compiled padded
step read the wrong heads on the H200 (2026-12-02). Such calls go through ``tpa::decode_strided``,
whose eager implementation reads the strides it is given. On the CPU the kernels run under Triton's
interpreter (``decode_impl="kernel"``), on a GPU compiled.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.kernels import KERNELS_RUNNABLE
from tpa import T6Cache, T6Config, T6ForCausalLM

pytestmark = pytest.mark.skipif(not KERNELS_RUNNABLE, reason="needs Triton kernels (GPU, or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 61

CASES = {  # name: (attention type, overrides)
    "tpa, A cache padded to 48 heads": ("tpa", dict(num_attention_heads=34, head_dim=16, q_rank=2, k_rank=2, v_rank=2,
                                                    tpa_cache_head_multiple=16)),
    "gqa, stride-0 head factors": ("gqa", dict(num_attention_heads=4, num_key_value_heads=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_kernel_step_equals_eager(case):
    attention_type, overrides = CASES[case]
    torch.manual_seed(0)
    config = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=1,
                                  initializer_range=0.2, decode_impl="kernel", **overrides)
    model = T6ForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(1, VOCAB, (2, 9), device=DEVICE)
    caches = [T6Cache.for_model(model, 2, capacity=16, static=True, cuda_graphs=False) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, cache=cache, use_cache=True)
        want = model(ids[:, :1], cache=caches[0], use_cache=True).logits
        step = torch.compile(lambda x: model(x, cache=caches[1], use_cache=True).logits, fullgraph=True)
        got = step(ids[:, :1])
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for eager_layer, compiled_layer in zip(caches[0].kv.layers, caches[1].kv.layers):
        for name, buf in eager_layer.buffers.items():  # the padding included: it stays zero
            torch.testing.assert_close(compiled_layer.buffers[name], buf, rtol=1e-5, atol=1e-5)
    assert caches[1].kv.num_columns == caches[0].kv.num_columns == 10
