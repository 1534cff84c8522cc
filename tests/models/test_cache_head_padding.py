"""``tpa_cache_head_multiple``: the cached head factors stored padded to a multiple of M heads (zeros)
decode exactly like the unpadded cache (same weights), through the reference path and through the
FlashTPA kernel reading the padded rows (``a_head_pad``), for dynamic and static caches and beam
search; readers see H heads, the padding stays zero, bad values are refused, the option round-trips."""

import pytest
import torch

from tests.ops.kernels import needs_cpu_kernels
from tpa import T6Cache, T6Config, T6ForCausalLM
from tpa.cache import KVCache
from tpa.layers import TensorProductAttention
from tpa.models.t6.hf_compat import output_cache

VOCAB = 61
GREEDY = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
# (heads, (R_q, R_k, R_v)): head counts not divisible by 16, ranks 1-3
SHAPES = [(34, (2, 1, 1)), (5, (3, 2, 3)), (5, (1, 3, 2))]


def pair(heads, ranks, multiple=16, **kw):
    """An unpadded model and the same weights with ``tpa_cache_head_multiple=multiple``."""
    q, k, v = ranks
    cfg = T6Config.from_preset("tiny", kw.pop("attention_type", "tpa"), vocab_size=VOCAB, num_hidden_layers=1,
                               num_attention_heads=heads, head_dim=16, q_rank=q, k_rank=k, v_rank=v,
                               initializer_range=0.2, **kw)
    plain = T6ForCausalLM(cfg).eval()
    padded = T6ForCausalLM(T6Config.from_dict({**cfg.to_dict(), "tpa_cache_head_multiple": multiple})).eval()
    padded.load_state_dict(plain.state_dict())
    return plain, padded


def assert_same(ref, out, tol=1e-4):
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def assert_padding_zero(cache, heads):
    for layer in cache.kv.layers:
        for name in ("a_k", "a_v"):
            buf = layer.buffers[name]
            assert buf.shape[-1] == -(-heads // 16) * 16 and layer.buffer(name).shape[-1] == heads
            assert torch.count_nonzero(buf[..., heads:]) == 0 and torch.count_nonzero(buf[..., :heads]) > 0


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("heads,ranks", SHAPES)
def test_padded_cache_generates_like_unpadded(heads, ranks, static):
    plain, padded = pair(heads, ranks)
    ids = torch.randint(1, VOCAB, (2, 5))
    kw = dict(GREEDY, cache_implementation="static") if static else GREEDY
    ref, out = plain.generate(ids, **kw), padded.generate(ids, **kw)
    assert_same(ref, out)
    cache = output_cache(out)
    assert cache.static == static
    assert_padding_zero(cache, heads)
    cfg = padded.config
    assert cache.elements_per_token() == [cfg.kv_cache_elements_per_token()] == output_cache(ref).elements_per_token()
    assert cache.stored_elements_per_token() == [cfg.kv_cache_stored_elements_per_token()]
    assert cfg.kv_cache_stored_elements_per_token() - cfg.kv_cache_elements_per_token() == \
        (ranks[1] + ranks[2]) * (-(-heads // 16) * 16 - heads)


@needs_cpu_kernels
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("attention_type,heads,ranks", [("tpa", 34, (1, 1, 1)), ("tpa", 5, (3, 2, 3)),
                                                         ("tpa_kvonly", 5, (1, 2, 1))])
def test_kernel_reads_the_padded_rows(attention_type, heads, ranks, static, monkeypatch):
    """decode_impl="kernel" (Triton, interpreted): the padded model's kernel steps (loads of
    ceil(H/16)*16 heads) give the unpadded reference path's tokens and scores."""
    pytest.importorskip("triton")
    import tpa.layers.tpa as tpa_layer

    plain, padded = pair(heads, ranks, attention_type=attention_type, decode_impl="kernel")
    plain.config.decode_impl = "reference"
    calls, original = [], tpa_layer.tpa_decode

    def spy(*args, **kwargs):
        calls.append((kwargs["options"], args[2].stride(2), args[4].shape[-1]))
        return original(*args, **kwargs)

    ids = torch.randint(1, VOCAB, (2, 5))
    kw = dict(GREEDY, max_new_tokens=3, **({"cache_implementation": "static"} if static else {}))
    ref = plain.generate(ids, **kw)
    monkeypatch.setattr(tpa_layer, "tpa_decode", spy)
    out = padded.generate(ids, **kw)
    assert_same(ref, out)
    options = padded.model.layers[0].self_attn.decode_options
    assert len(calls) == 3 and all(c == (options, 48 if heads == 34 else 16, heads) for c in calls)
    assert options.a_head_pad == 16  # one object per layer, the same on every call
    assert options.a_dot is False  # the padded rows by plain loads, the path this layout was measured with


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_beam_search_over_a_padded_cache(static):
    plain, padded = pair(5, (2, 2, 1))
    ids = torch.randint(1, VOCAB, (2, 4))
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, return_dict_in_generate=True,
              cache_implementation="static" if static else None)
    ref, out = plain.generate(ids, **kw), padded.generate(ids, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    assert_padding_zero(output_cache(out), 5)


def test_select_and_crop_keep_views_and_zero_padding():
    _, model = pair(5, (2, 2, 2))
    cache = T6Cache.for_model(model, batch_size=3)
    model(torch.randint(1, VOCAB, (3, 6)), cache=cache, use_cache=True)
    layer = cache.kv.layers[0]
    before = layer.buffer("a_k").clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.buffer("a_k"), before[[2, 0, 0]])
    assert layer.buffer("a_k").data_ptr() == layer.buffers["a_k"].data_ptr()
    cache.crop(-2)
    model(torch.randint(1, VOCAB, (3, 1)), cache=cache, use_cache=True)
    assert cache.kv.seqlens.tolist() == [5, 5, 5]
    assert_padding_zero(cache, 5)


def test_a_cache_built_without_the_padding_is_refused():
    _, model = pair(5, (1, 1, 1))
    specs = [block.self_attn.cache_spec() for block in model.model.layers]
    with pytest.raises(ValueError, match="tpa_cache_head_multiple pads the head factors"):
        model(torch.randint(1, VOCAB, (1, 3)), cache=T6Cache(specs, 1), use_cache=True)


@pytest.mark.parametrize("bad", [0, -16, 1.5, True, "16", None])
def test_bad_multiples_are_refused(bad):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        T6Config.from_preset("tiny", tpa_cache_head_multiple=bad)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        TensorProductAttention(32, 5, 16, cache_head_multiple=bad)


@pytest.mark.parametrize("overrides,named", [
    ({"attention_type": "gqa"}, "is a TPA option"),
    ({"tpa_share_kv_b": True}, "share_kv_b=True keeps off"),
    ({"tpa_order": 3, "tpa_c_dim": 2}, "order=3 keeps off"),
    ({"attn_impl": "factors"}, "attn_impl='factors' keeps off"),
    ({"tpa_contextual_a": False}, "contextual_a=False keeps off"),
])
def test_multiples_where_the_kernel_never_reads_the_cache_are_refused(overrides, named):
    overrides = dict(overrides)
    kind = overrides.pop("attention_type", "tpa")
    with pytest.raises(ValueError, match=named):
        T6Config.from_preset("tiny", kind, tpa_cache_head_multiple=16, **overrides)
    assert T6Config.from_preset("tiny", kind, tpa_cache_head_multiple=1, **overrides).tpa_cache_head_multiple == 1


def test_layer_cache_refuses_storage_smaller_than_its_spec():
    spec = {"a_k": (2, 5), "b_k": (2, 16)}
    with pytest.raises(ValueError, match="at least as large"):
        KVCache([spec], batch_size=1, storage=[{"a_k": (2, 4), "b_k": (2, 16)}])
    with pytest.raises(ValueError, match="storage names"):
        KVCache([spec], batch_size=1, storage=[{"a_k": (2, 16)}])
    with pytest.raises(ValueError, match="one entry per layer"):
        KVCache([spec], batch_size=1, storage=[None, None])


def test_option_round_trips_through_save_and_load(tmp_path):
    _, model = pair(5, (1, 2, 2))
    model.save_pretrained(tmp_path)
    loaded = T6ForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.tpa_cache_head_multiple == 16
    assert loaded.model.layers[0].self_attn.cache_storage()["a_v"] == (2, 16)
    assert T6Config.from_dict(model.config.to_dict()).tpa_cache_head_multiple == 16
    ids = torch.randint(1, VOCAB, (1, 4))
    assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False),
                       model.generate(ids, max_new_tokens=3, do_sample=False))


def test_default_layout_is_unpadded():
    cfg = T6Config.from_preset("tiny", vocab_size=VOCAB, num_hidden_layers=1)
    attn = T6ForCausalLM(cfg).model.layers[0].self_attn
    assert cfg.tpa_cache_head_multiple == 1 and attn.decode_options is None
    assert attn.cache_storage() == attn.cache_spec()
    assert cfg.kv_cache_stored_elements_per_token() == cfg.kv_cache_elements_per_token()


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-cuda-graphs"])
def test_padded_cache_on_cuda_generates_like_unpadded(static):
    """On CUDA (decode_impl="auto": the kernel; a static cache replays CUDA graphs), at small's H=34."""
    plain, padded = (m.cuda() for m in pair(34, (6, 2, 2)))
    ids = torch.randint(1, VOCAB, (3, 40), device="cuda")
    kw = dict(GREEDY, max_new_tokens=8, cache_implementation="static" if static else None)
    with torch.no_grad():
        ref, out = plain.generate(ids, **kw), padded.generate(ids, **kw)
    assert_same(ref, out)
    assert_padding_zero(output_cache(out), 34)
