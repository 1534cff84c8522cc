"""The paper's code's model options as config values: per-head output RMSNorm (``attention_head_norm``),
partial RoPE (``rope_partial_factor``), MLA's value head size (``v_head_dim``), MLA's latent-norm eps.
Each gets the tests our variants have: cached decoding == full forward, Algorithm 1 == materialised,
Theorem 3.1 on the rotated part, Table 1 accounting measured on the layers and the cache."""

import pytest
import torch

from tpa import T6Config, T6ForCausalLM
from tpa.layers import AttentionContext, MultiHeadAttention, TensorProductAttention
from tpa.layers.base import apply_partial_rotary, partial_rotary_dim
from tpa.models.t6.configuration_t6 import attention_parameters
from tpa.models.t6.hf_compat import output_cache
from tpa.models.t6.modeling_t6 import build_attention
from tpa.modules import RotaryEmbedding, apply_rotary
from tpa.ops import materialize

F64 = torch.float64
VOCAB = 83
OPTIONS = [
    {"attention_type": "tpa", "attention_head_norm": True},
    {"attention_type": "tpa", "rope_partial_factor": 1 / 3},
    {"attention_type": "tpa", "rope_partial_factor": 0.5, "attention_head_norm": True, "attn_impl": "factors"},
    {"attention_type": "tpa", "rope_partial_factor": 0.5, "tpa_share_kv_b": True},
    {"attention_type": "tpa", "rope_partial_factor": 0.5, "tpa_contextual_b": False},
    {"attention_type": "tpa", "attention_head_norm": True, "attention_output_gate": True},
    {"attention_type": "tpa_kvonly", "rope_partial_factor": 1 / 3, "attention_head_norm": True},
    {"attention_type": "mha", "rope_partial_factor": 0.25, "attention_head_norm": True},
    {"attention_type": "gqa", "rope_partial_factor": 0.5},
    {"attention_type": "mqa", "attention_head_norm": True},
    {"attention_type": "mla", "v_head_dim": 24},
    {"attention_type": "mla", "v_head_dim": 24, "mla_absorb": False, "attention_head_norm": True},
    {"attention_type": "mla", "attention_head_norm": True, "mla_latent_norm_eps": 1e-3},
]


def option_id(o):
    return "-".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items())


def tiny(initializer_range=0.1, **overrides):
    overrides = dict(overrides)
    cfg = T6Config.from_preset("tiny", overrides.pop("attention_type"), vocab_size=VOCAB, num_hidden_layers=2,
                               initializer_range=initializer_range, **overrides)
    model = T6ForCausalLM(cfg).eval()
    with torch.no_grad():  # gains away from one, so a wrongly placed or missing norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("overrides", OPTIONS, ids=option_id)
def test_decode_equals_full_forward(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, VOCAB, (2, 13))
    out = model(ids[:, :5], use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(5, 13):
        logits.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert rel_err(torch.cat(logits, dim=1), model(ids).logits) <= 1e-4


PLAIN = [o for o in OPTIONS if not {"tpa_share_kv_b", "tpa_contextual_b", "attention_output_gate"} & set(o)]


@pytest.mark.parametrize("overrides", PLAIN, ids=option_id)
def test_table1_accounting_measured(overrides):
    """Parameters of each layer == the config's Table 1 count (+ head-norm gains); measured cache == Table 1."""
    model = tiny(**overrides)
    cfg = model.config
    for layer in model.model.layers:
        attn = layer.self_attn
        params = sum(p.numel() for name, p in attn.named_parameters()
                     if not name.startswith(("q_a_norm", "kv_a_norm")))
        assert params == cfg.attention_parameters_per_layer()
        assert (attn.head_norm is not None) == cfg.attention_head_norm
    out = model(torch.randint(0, VOCAB, (2, 6)), use_cache=True)
    measured = output_cache(out).elements_per_token()
    assert measured == [cfg.kv_cache_elements_per_token()] * cfg.num_hidden_layers


def test_mla_value_head_size_in_table1():
    cfg = T6Config.from_preset("small", "mla", v_head_dim=96, mla_latent_norm=False)
    with torch.device("meta"):
        layer = build_attention(cfg, 0.02)
    h, d, e, c = cfg.num_attention_heads, cfg.head_dim, 96, cfg.hidden_size
    dc, dq, dr = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim
    by_hand = dq * (c + h * d + h * dr) + dc * (c + h * d + h * e) + c * (h * e + dr)
    assert sum(p.numel() for p in layer.parameters()) == by_hand == attention_parameters(
        "mla", c, h, d, d_c=dc, d_c_q=dq, d_rope=dr, v_head_dim=e)
    assert cfg.kv_cache_elements_per_token() == dc + dr  # the value size does not touch MLA's cache


def test_head_norm_is_rmsnorm_with_gain_over_each_head():
    layer = MultiHeadAttention(24, 3, 8, head_norm=True).to(F64)
    with torch.no_grad():
        layer.head_norm.weight.uniform_(0.5, 1.5)
    seen = {}
    layer.head_norm.register_forward_pre_hook(lambda m, args: seen.update(heads=args[0]))
    layer.o_proj.register_forward_pre_hook(lambda m, args: seen.update(normed=args[0]))
    x = torch.randn(2, 5, 24, dtype=F64)
    cos, sin = RotaryEmbedding(8)(torch.arange(5).expand(2, 5), F64)
    layer(x, AttentionContext(cos=cos, sin=sin))
    heads = seen["heads"]
    assert heads.shape == (2, 5, 3, 8)
    by_hand = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.head_norm.weight
    assert torch.allclose(seen["normed"], by_hand.flatten(2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor,rotated", [(1.0, 16), (0.5, 8), (1 / 3, 4), (0.2, 2)])
def test_partial_rotary_dim_rule(factor, rotated):
    assert partial_rotary_dim(16, factor) == rotated
    layer = TensorProductAttention(32, 3, 16, rope_partial_factor=factor)
    assert layer.rope_dim == rotated


def test_theorem_3_1_on_the_rotated_part():
    """Partial RoPE on the B factors == partial RoPE on the materialised Q/K (the unrotated features pass
    through); the attention logits depend on relative positions only."""
    bsz, seq, heads, dim, rot = 2, 9, 4, 12, 4
    g = torch.Generator().manual_seed(0)
    a_q, b_q = torch.randn(bsz, seq, 3, heads, dtype=F64, generator=g), torch.randn(bsz, seq, 3, dim, dtype=F64, generator=g)
    a_k, b_k = torch.randn(bsz, seq, 2, heads, dtype=F64, generator=g), torch.randn(bsz, seq, 2, dim, dtype=F64, generator=g)
    rope = RotaryEmbedding(rot)
    positions = torch.arange(seq).expand(bsz, seq)

    def logits(shift):
        cos, sin = rope(positions + shift, F64)
        q = materialize(a_q, apply_partial_rotary(b_q, cos, sin))
        k = materialize(a_k, apply_partial_rotary(b_k, cos, sin))
        q_rot = apply_partial_rotary(materialize(a_q, b_q), cos, sin)
        assert (q - q_rot).abs().max().item() <= 1e-12
        assert torch.equal(q[..., rot:], materialize(a_q, b_q)[..., rot:])
        assert torch.allclose(q[..., :rot], apply_rotary(materialize(a_q, b_q)[..., :rot], cos, sin), atol=1e-12)
        return torch.einsum("bqhd,bkhd->bhqk", q, k)

    assert (logits(0) - logits(417)).abs().max().item() <= 1e-9


@pytest.mark.parametrize("variant", [
    {"rope_partial_factor": 0.5},
    {"rope_partial_factor": 0.25, "head_norm": True},
    {"rope_partial_factor": 0.5, "factorize_q": False, "head_norm": True},
    {"rope_partial_factor": 0.5, "contextual_b": False},
])
def test_algorithm_1_equals_materialised_with_options(variant):
    a = TensorProductAttention(32, 5, 16, 3, 2, 1, **variant).to(F64)
    b = TensorProductAttention(32, 5, 16, 3, 2, 1, attn_impl="factors", **variant).to(F64)
    with torch.no_grad():
        if a.head_norm is not None:
            a.head_norm.weight.uniform_(0.5, 1.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 10, 32, dtype=F64)
    cos, sin = RotaryEmbedding(a.rope_dim)(torch.arange(10).expand(2, 10), F64)
    ctx = AttentionContext(cos=cos, sin=sin, rotary=RotaryEmbedding(a.rope_dim))
    assert (a(x, ctx) - b(x, ctx)).abs().max().item() <= 1e-10


def test_partial_rope_model_is_shift_invariant():
    model = tiny(attention_type="tpa", rope_partial_factor=0.5, initializer_range=0.02).double()
    ids = torch.randint(0, VOCAB, (2, 11))
    pos = torch.arange(11).expand(2, 11)
    assert rel_err(model(ids, position_ids=pos + 200).logits, model(ids, position_ids=pos).logits) <= 1e-10


def test_option_errors_are_clear():
    with pytest.raises(ValueError, match="v_head_dim is an MLA option"):
        T6Config.from_preset("tiny", "tpa", v_head_dim=48)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        T6Config.from_preset("tiny", "mla", rope_partial_factor=0.5)
    with pytest.raises(ValueError, match=r"rope_partial_factor must be a number in \(0, 1\]"):
        T6Config.from_preset("tiny", "tpa", rope_partial_factor=0.0)
    with pytest.raises(ValueError, match="RoPE needs at least 2"):
        TensorProductAttention(32, 2, 16, rope_partial_factor=0.1)
    with pytest.raises(ValueError, match="second-order"):
        TensorProductAttention(32, 2, 16, order=3, c_dim=2, rope_partial_factor=0.5)


def test_options_survive_save_and_load(tmp_path):
    model = tiny(attention_type="mla", v_head_dim=24, attention_head_norm=True, mla_latent_norm_eps=1e-3)
    model.save_pretrained(tmp_path)
    loaded = T6ForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.v_head_dim, loaded.config.attention_head_norm, loaded.config.mla_latent_norm_eps) == \
        (24, True, 1e-3)
    assert loaded.model.layers[0].self_attn.kv_a_norm.eps == 1e-3
    ids = torch.randint(0, VOCAB, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_decode_kernel_path_with_head_norm_and_partial_rope():
    """The FlashTPA kernel (Triton, interpreted on CPU) serves models with these options unchanged."""
    pytest.importorskip("triton")
    ref = tiny(attention_type="tpa", attention_head_norm=True, rope_partial_factor=0.5, decode_impl="reference")
    kernel = T6ForCausalLM(T6Config.from_dict({**ref.config.to_dict(), "decode_impl": "kernel"})).eval()
    kernel.load_state_dict(ref.state_dict())
    ids = torch.randint(0, VOCAB, (2, 6))
    steps = []
    for model in (ref, kernel):
        out = model(ids[:, :4], use_cache=True)
        cache = output_cache(out)
        steps.append(torch.cat([model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in (4, 5)], 1))
    assert rel_err(steps[1], steps[0]) <= 1e-4
