"""T6 model invariants: cached decoding equals a full forward, Table 1 accounting, training, errors."""

import math

import pytest
import torch

import tpa
from tpa import T6Config, T6ForCausalLM
from tpa.models.t6.configuration_t6 import attention_parameters
from tpa.models.t6.modeling_t6 import build_attention
from tpa.models.t6.hf_compat import output_cache

VOCAB = 97
TPA_VARIANTS = [
    {"attention_type": "tpa", "tpa_contextual_a": False},
    {"attention_type": "tpa", "tpa_contextual_b": False},
    {"attention_type": "tpa", "tpa_share_kv_b": True},
    {"attention_type": "tpa", "tpa_share_kv_b": True, "tpa_contextual_b": False},
    {"attention_type": "tpa", "tpa_head_activation": "softmax"},
    {"attention_type": "tpa", "tpa_order": 3, "tpa_c_dim": 2},
    {"attention_type": "tpa", "attention_output_gate": True},
    {"attention_type": "tpa", "attn_impl": "factors"},
    {"attention_type": "tpa", "q_rank": 1, "k_rank": 3, "v_rank": 1},
    {"attention_type": "mla", "mla_absorb": False},
    {"attention_type": "gqa", "num_key_value_heads": 3},
]


def tiny(attention_type="tpa", **kw):
    cfg = T6Config.from_preset("tiny", attention_type, vocab_size=VOCAB, num_hidden_layers=2, **kw)
    return T6ForCausalLM(cfg).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def decode_all(model, ids, prefill, attention_mask=None):
    """Prefill ``ids[:, :prefill]`` then feed one token at a time; returns the logits of every step."""
    out = model(ids[:, :prefill], attention_mask=None if attention_mask is None else attention_mask[:, :prefill],
                use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(prefill, ids.shape[1]):
        mask = None if attention_mask is None else attention_mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_prefill_then_decode_equals_full_forward(attention_type):
    model = tiny(attention_type)
    ids = torch.randint(0, VOCAB, (3, 21))
    full = model(ids).logits
    inc, _ = decode_all(model, ids, prefill=8)
    assert rel_err(inc, full) <= 1e-4


@pytest.mark.parametrize("overrides", TPA_VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_variants_decode_equals_full_forward(overrides):
    overrides = dict(overrides)
    model = tiny(overrides.pop("attention_type"), **overrides)
    ids = torch.randint(0, VOCAB, (2, 13))
    inc, _ = decode_all(model, ids, prefill=5)
    assert rel_err(inc, model(ids).logits) <= 1e-4


@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_ragged_batch_decode_equals_each_sequence_alone(attention_type, side):
    """Prompts of lengths 5, 9 and 1, padded into one batch, decode like each prompt alone."""
    model = tiny(attention_type)
    lengths, width, new = [5, 9, 1], 9, 4
    seqs = [torch.randint(0, VOCAB, (n + new,)) for n in lengths]
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = seqs[b][:n], 1
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = output_cache(out)
    assert cache.kv.seqlens.tolist() == lengths
    prompt_logits = out.logits
    step_logits = []
    for t in range(new):
        tok = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step_logits.append(model(tok, attention_mask=mask, cache=cache, use_cache=True).logits[:, 0])
    for b, n in enumerate(lengths):
        alone = model(seqs[b][None]).logits[0]
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        assert rel_err(prompt_logits[b, sl], alone[:n]) <= 1e-4
        assert rel_err(torch.stack([s[b] for s in step_logits]), alone[n:]) <= 1e-4


def test_padded_forward_without_cache_equals_each_sequence():
    model = tiny("tpa")
    a, b = torch.randint(0, VOCAB, (7,)), torch.randint(0, VOCAB, (3,))
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 4:] = a, b
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    logits = model(ids, attention_mask=mask).logits
    assert rel_err(logits[0], model(a[None]).logits[0]) <= 1e-5
    assert rel_err(logits[1, 4:], model(b[None]).logits[0]) <= 1e-5


def test_explicit_position_ids_shift_leaves_logits_unchanged():
    """Theorem 3.1 at model level: shifting all positions by a constant changes nothing."""
    model = tiny("tpa").double()
    ids = torch.randint(0, VOCAB, (2, 11))
    pos = torch.arange(11).expand(2, 11)
    assert rel_err(model(ids, position_ids=pos + 300).logits, model(ids, position_ids=pos).logits) <= 1e-10


@pytest.mark.parametrize("preset", ["small", "medium", "large", "xl"])
@pytest.mark.parametrize("attention_type", tpa.ATTENTION_TYPES)
def test_table1_cache_and_parameters(preset, attention_type):
    cfg = T6Config.from_preset(preset, attention_type, mla_latent_norm=False)
    h, d, c = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    expected_cache = {
        "tpa": (cfg.k_rank + cfg.v_rank) * (h + d),
        "tpa_kvonly": (cfg.k_rank + cfg.v_rank) * (h + d),
        "mha": 2 * h * d,
        "mqa": 2 * d,
        "gqa": 2 * 2 * d,
        "mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
    }[attention_type]
    assert cfg.kv_cache_elements_per_token() == expected_cache
    with torch.device("meta"):
        layer = build_attention(cfg, 0.02)
    assert layer.kv_cache_elements_per_token() == expected_cache
    params = sum(p.numel() for p in layer.parameters())
    assert params == attention_parameters(
        attention_type, c, h, d, q_rank=6, k_rank=2, v_rank=2, kv_heads=2,
        d_c=cfg.kv_lora_rank, d_c_q=cfg.q_lora_rank, d_rope=32,
    )
    # "the same attention parameters as MHA": Table 10's head counts land within 3% of 4 d^2, except
    # MLA, whose Table 10 head counts give 0.93x to 1.64x under Table 1's own formula (kept as published)
    if attention_type != "mla":
        assert abs(params - 4 * c * c) / (4 * c * c) < 0.03


def test_table10_presets():
    assert T6Config.from_preset("small", "tpa").num_attention_heads == 34
    assert T6Config.from_preset("xl", "tpa").num_attention_heads == 78
    cfg = T6Config.from_preset("medium", "mla")
    assert (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.q_lora_rank) == (23, 512, 1024)
    cfg = T6Config.from_preset("large", "gqa")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers, cfg.hidden_size) == (38, 2, 36, 1280)


@pytest.mark.parametrize(
    "overrides,elements",
    [
        ({"tpa_contextual_a": False}, lambda c: (c.k_rank + c.v_rank) * c.head_dim),
        ({"tpa_contextual_b": False}, lambda c: (c.k_rank + c.v_rank) * c.num_attention_heads),
        ({"tpa_share_kv_b": True}, lambda c: (c.k_rank + c.v_rank) * c.num_attention_heads + c.k_rank * c.head_dim),
    ],
)
def test_variant_cache_sizes_measured_on_tensors(overrides, elements):
    model = tiny("tpa", **overrides)
    out = model(torch.randint(0, VOCAB, (2, 5)), use_cache=True)
    measured = output_cache(out).elements_per_token()
    assert measured == [elements(model.config)] * model.config.num_hidden_layers
    assert model.config.kv_cache_elements_per_token() == elements(model.config)


def test_tiny_model_loss_goes_down():
    model = tiny("tpa").train()
    ids = torch.randint(0, VOCAB, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert math.isfinite(losses[-1])


def test_lm_head_is_tied_by_default():
    model = tiny("tpa")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bad_inputs_raise_clear_errors():
    from tpa.layers import AttentionContext, MultiHeadAttention, TensorProductAttention

    with pytest.raises(ValueError, match="q_rank"):
        TensorProductAttention(32, 4, 8, q_rank=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(32, 6, 8, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        T6Config(attention_type="gqa", num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="unknown attention_type"):
        T6Config(attention_type="linear")
    with pytest.raises(ValueError, match="unknown preset"):
        T6Config.from_preset("huge")
    layer = TensorProductAttention(32, 4, 8)
    cos = sin = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match=r"\[batch, seq, 32\]"):
        layer(torch.randn(1, 3, 31), AttentionContext(cos=cos, sin=sin))
    model = tiny("tpa", max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, VOCAB, (1, 17)))
    out = model(torch.randint(0, VOCAB, (1, 10)), use_cache=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, VOCAB, (1, 7)), cache=output_cache(out), use_cache=True)
    out = model(torch.randint(0, VOCAB, (2, 4)), use_cache=True)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.randint(0, VOCAB, (3, 1)), cache=output_cache(out), use_cache=True)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[VOCAB]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, VOCAB, (2, 4)), attention_mask=torch.ones(2, 3))
