"""RoPE tables: computed once in float32 from float64 angles, gathered by position, never cast by the
model's dtype, never stored in a checkpoint, no sine or cosine evaluated in a forward."""

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import tpa
from tpa import T6Config, T6ForCausalLM
from tpa.models.t6.hf_compat import output_cache
from tpa.modules import RotaryEmbedding

TRANSCENDENTALS = {torch.ops.aten.cos.default, torch.ops.aten.sin.default}


class CountTranscendentals(TorchDispatchMode):
    """Counts aten cos/sin calls under the mode."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in TRANSCENDENTALS
        return func(*args, **(kwargs or {}))


def tiny(attention_type="tpa", **kw):
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=61, num_hidden_layers=3, **kw)
    return T6ForCausalLM(cfg)


def test_long_positions_keep_float64_precision():
    """The float32 tables are the float64 cos/sin rounded once: exact to float32 rounding even at
    position 131,071, where angles formed in float32 are off by ~1e-2."""
    rope = RotaryEmbedding(64, max_positions=1 << 17)
    positions = torch.tensor([[0, 1, 4095, 65_537, (1 << 17) - 1]])
    cos, sin = rope(positions)
    exact_cos, exact_sin = rope(positions, torch.float64)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (1, 5, 32)
    assert (cos.double() - exact_cos).abs().max() <= 2**-24 and (sin.double() - exact_sin).abs().max() <= 2**-24
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    naive = (positions.float()[..., None] * inv_freq).cos()  # the float32 formation these tables avoid
    assert (naive.double() - exact_cos).abs().max() > 1e-4


def test_float64_request_is_exact_at_any_position():
    rope = RotaryEmbedding(8, theta=500.0, max_positions=4)
    positions = torch.tensor([[10**6, 3]])
    cos, sin = rope(positions, torch.float64)
    freqs = 1.0 / 500.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert torch.equal(cos, (positions.double()[..., None] * freqs).cos())
    assert torch.equal(sin, (positions.double()[..., None] * freqs).sin())


def test_positions_outside_the_table_are_a_clear_error():
    rope = RotaryEmbedding(8, max_positions=16)
    for bad in (16, -1):
        with pytest.raises(IndexError):  # never a wrapped-around row
            rope(torch.tensor([[0, bad]]))
    with pytest.raises(ValueError, match="max_positions"):
        RotaryEmbedding(8, max_positions=0)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "double", "to_float16_kw"])
def test_tables_stay_float32_under_model_dtype_casts(cast):
    model = tiny()
    rope = model.model.rotary
    cos, sin = rope.cos_table.clone(), rope.sin_table.clone()
    assert cos.dtype == torch.float32 and cos.shape == (model.config.max_position_embeddings, rope.dim // 2)
    {"to_bf16": lambda: model.to(torch.bfloat16), "half": model.half, "bfloat16": model.bfloat16,
     "double": model.double, "to_float16_kw": lambda: model.to(dtype=torch.float16)}[cast]()
    assert model.model.embed_tokens.weight.dtype != torch.float32  # the cast did happen
    assert torch.equal(rope.cos_table, cos) and torch.equal(rope.sin_table, sin)  # rebuilt bitwise, not rounded
    assert rope.cos_table.dtype == rope.sin_table.dtype == torch.float32


def test_to_empty_rebuilds_the_tables():
    model = tiny("mha")
    cos = model.model.rotary.cos_table.clone()
    model.to_empty(device="cpu")
    assert torch.equal(model.model.rotary.cos_table, cos)


def test_tables_are_not_in_the_state_dict_and_survive_from_pretrained(tmp_path):
    model = tiny("mla")
    rope = model.model.rotary
    assert not any("table" in key for key in model.state_dict())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("table" in key for key in f.keys())  # noqa: SIM118 - a safetensors handle, not a dict
    for dtype in (torch.float32, torch.bfloat16):
        loaded = T6ForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert loaded.model.embed_tokens.weight.dtype == dtype
        assert loaded.model.rotary.cos_table.dtype == torch.float32
        assert torch.equal(loaded.model.rotary.cos_table, rope.cos_table)
        assert torch.equal(loaded.model.rotary.sin_table, rope.sin_table)


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_forward_and_backward_evaluate_no_sine_or_cosine(attention_type):
    """Eager training step and cached decoding gather table rows: no aten.cos/sin at all."""
    model = tiny(attention_type)
    ids = torch.randint(0, 61, (2, 9))
    with CountTranscendentals() as counter:
        model(input_ids=ids, labels=ids).loss.backward()
        model.eval()
        with torch.no_grad():
            out = model(ids[:, :5], use_cache=True)
            model(ids[:, 5:6], cache=output_cache(out), use_cache=True)
    assert counter.calls == 0


def test_share_kv_b_rotates_cached_keys_from_the_table():
    """The variant that rotates cached keys when read gathers their rows too (no cos/sin per layer)."""
    model = tiny("tpa", tpa_share_kv_b=True).eval()
    ids = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        with CountTranscendentals() as counter:
            step = model(ids[:, 6:], cache=output_cache(out), use_cache=True).logits
    assert counter.calls == 0
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_model_rejects_position_ids_outside_the_tables():
    model = tiny("gqa")
    ids = torch.randint(0, 61, (1, 4))
    for bad in (torch.tensor([[0, 1, 2, 1024]]), torch.tensor([[-1, 0, 1, 2]])):
        with pytest.raises(ValueError, match=r"position ids must lie in \[0, 1024\)"):
            model(ids, position_ids=bad)
