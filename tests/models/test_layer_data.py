"""What a layer reads comes through its call: the key slots' RoPE tables are on the cache step, made
once per forward by the model (not by each layer from the model-wide cache and the RoPE module)."""

import pytest
import torch

from tpa import T6Config, T6ForCausalLM
from tpa.layers import AttentionContext, TensorProductAttention
from tpa.models.t6.hf_compat import output_cache
from tpa.modules import RotaryEmbedding


@pytest.mark.parametrize("variant, rotates", [
    ({}, False),
    ({"tpa_share_kv_b": True}, True),
    ({"tpa_contextual_b": False}, True),
])
def test_model_puts_key_tables_on_the_step_once(variant, rotates, monkeypatch):
    cfg = T6Config.from_preset("tiny", "tpa", vocab_size=97, num_hidden_layers=3, **variant)
    model = T6ForCausalLM(cfg).eval()
    assert [b.self_attn.rotates_cached_keys for b in model.model.layers] == [rotates] * 3
    calls = []
    rotary_forward = RotaryEmbedding.forward
    monkeypatch.setattr(RotaryEmbedding, "forward",
                        lambda self, pos, **kw: calls.append(tuple(pos.shape)) or rotary_forward(self, pos, **kw))
    with torch.no_grad():
        out = model(torch.randint(1, 97, (2, 5)), use_cache=True)
        calls.clear()
        model(torch.randint(1, 97, (2, 1)), cache=output_cache(out), use_cache=True)
    # the new token's tables, plus (for a layer that rotates cached keys) the 6 key slots' tables once
    assert calls == ([(2, 1), (2, 6)] if rotates else [(2, 1)])


def test_layer_with_a_context_without_step_tables_still_works():
    """A context built by hand as before (kv_cache and rotary, no tables on the step) gives the same."""
    from tpa.cache import KVCache

    torch.manual_seed(0)
    layer = TensorProductAttention(32, 4, 8, share_kv_b=True).eval()
    rotary = RotaryEmbedding(layer.rope_dim)
    outs = []
    for with_tables in (True, False):
        kv = KVCache([layer.cache_spec()], batch_size=1, capacity=8, dtype=torch.float32)
        x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
        results = []
        for chunk in x.split(2, dim=1):
            step = kv.begin(torch.ones(1, chunk.shape[1], dtype=torch.bool))
            cos, sin = rotary(step.positions)
            if with_tables:
                step.key_cos, step.key_sin = rotary(step.key_positions)
            ctx = AttentionContext(cos=cos, sin=sin, mask=step.mask, cache=kv.layers[0], step=step, kv_cache=kv,
                                   rotary=rotary)
            with torch.no_grad():
                results.append(layer(chunk, ctx))
            kv.commit(step)
        outs.append(torch.cat(results, dim=1))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
