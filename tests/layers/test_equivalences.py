"""The paper's proven equivalences as tests: Section 4, Theorem 3.1, Theorem C.1, Algorithm 1."""

import pytest
import torch

from tpa.layers import AttentionContext, MultiHeadAttention, TensorProductAttention
from tpa.layers.tpa import expand_third_order
from tpa.modules import RotaryEmbedding, apply_rotary
from tpa.ops import materialize, tpa_attention_factors

F64 = torch.float64


def ctx_for(positions, dim, theta=10000.0):
    cos, sin = RotaryEmbedding(dim, theta)(positions, F64)
    return AttentionContext(cos=cos, sin=sin)


def sdpa_reference(q, k, v):
    """Plain causal softmax attention in float64: q [B,T,H,D], k/v [B,T,H,*]."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    return torch.einsum("bhqk,bkhe->bqhe", logits.softmax(-1), v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 6), (6, 1), (6, 2), (6, 3), (34, 17)])
def test_mha_mqa_gqa_are_noncontextual_tpa(num_heads, num_kv_heads):
    """Section 4: with head factors h*e_i (queries), G*mask_j (keys/values), TPA equals MHA/MQA/GQA."""
    hidden, head_dim, seq = 48, 16, 11
    mha = MultiHeadAttention(hidden, num_heads, head_dim, num_kv_heads).to(F64)
    tpa = TensorProductAttention(
        hidden, num_heads, head_dim, q_rank=num_heads, k_rank=num_kv_heads, v_rank=num_kv_heads, contextual_a=False
    ).to(F64)
    group = num_heads // num_kv_heads
    masks = torch.zeros(num_kv_heads, num_heads, dtype=F64)
    for h in range(num_heads):
        masks[h // group, h] = 1.0
    with torch.no_grad():
        tpa.a_q.copy_(num_heads * torch.eye(num_heads, dtype=F64))
        tpa.a_k.copy_(num_kv_heads * masks)
        tpa.a_v.copy_(num_kv_heads * masks)
        tpa.proj.weight.copy_(mha.qkv_proj.weight)  # b_q, b_k, b_v rows are the q, k, v heads
        tpa.o_proj.weight.copy_(mha.o_proj.weight)
    x = torch.randn(3, seq, hidden, dtype=F64)
    ctx = ctx_for(torch.arange(seq).expand(3, seq), head_dim)
    diff = (tpa(x, ctx) - mha(x, ctx)).abs().max().item()
    assert diff <= 1e-10


def random_factors(bsz, seq, rank, heads, dim):
    return torch.randn(bsz, seq, rank, heads, dtype=F64), torch.randn(bsz, seq, rank, dim, dtype=F64)


@pytest.mark.parametrize("ranks", [(1, 1), (2, 3), (6, 2)])
def test_theorem_3_1_prerotated_factors(ranks):
    """RoPE on the B factors equals RoPE on the materialised Q and K; a common shift changes nothing."""
    r_q, r_k = ranks
    bsz, seq, heads, dim = 2, 13, 5, 16
    a_q, b_q = random_factors(bsz, seq, r_q, heads, dim)
    a_k, b_k = random_factors(bsz, seq, r_k, heads, dim)
    a_v, b_v = random_factors(bsz, seq, 2, heads, dim)
    rope = RotaryEmbedding(dim)
    positions = torch.arange(seq).expand(bsz, seq) + torch.tensor([[0], [7]])

    def attention(shift):
        cos, sin = rope(positions + shift, F64)
        factored = sdpa_reference(
            materialize(a_q, apply_rotary(b_q, cos, sin)),
            materialize(a_k, apply_rotary(b_k, cos, sin)),
            materialize(a_v, b_v),
        )
        # RoPE_t(Q_t) on the materialised query, eq. (3.6)
        q_rot = apply_rotary(materialize(a_q, b_q), cos, sin)
        k_rot = apply_rotary(materialize(a_k, b_k), cos, sin)
        assert torch.allclose(q_rot, materialize(a_q, apply_rotary(b_q, cos, sin)), atol=1e-12, rtol=0)
        materialized = sdpa_reference(q_rot, k_rot, materialize(a_v, b_v))
        assert (factored - materialized).abs().max().item() <= 1e-10
        return factored

    base = attention(0)
    assert (attention(1000) - base).abs().max().item() <= 1e-9


def test_theorem_3_1_layer_shift_invariance():
    """A TPA layer's output does not change when every position moves by the same constant."""
    layer = TensorProductAttention(40, 7, 16, 3, 2, 1).to(F64)
    x = torch.randn(2, 9, 40, dtype=F64)
    pos = torch.arange(9).expand(2, 9)
    out = layer(x, ctx_for(pos, 16))
    shifted = layer(x, ctx_for(pos + 513, 16))
    assert (out - shifted).abs().max().item() <= 1e-10


@pytest.mark.parametrize("c_dim", [2, 4])
def test_theorem_c_1_third_order(c_dim):
    """Rotating b_r then forming vec(b_r (x) c_r) equals RoPE T_t = I (x) R_t^T on the full query; and
    the rotated third-order queries and keys keep RoPE's relative-position identity."""
    bsz, seq, heads, head_dim, rank = 2, 7, 3, 16, 2
    d_b = head_dim // c_dim
    a = torch.randn(bsz, seq, rank, heads, dtype=F64)
    b = torch.randn(bsz, seq, rank, d_b, dtype=F64)
    c = torch.randn(bsz, seq, rank, c_dim, dtype=F64)
    rope = RotaryEmbedding(d_b)
    positions = torch.arange(seq).expand(bsz, seq)
    cos, sin = rope(positions, F64)
    q = materialize(a, expand_third_order(b, c))  # [B,T,H,D]
    # T_t acts block-wise on the d_b-sized blocks of the D-dim feature vector
    q_rot = apply_rotary(q.unflatten(-1, (c_dim, d_b)), cos, sin).flatten(-2)
    q_factored = materialize(a, expand_third_order(apply_rotary(b, cos, sin), c))
    assert (q_rot - q_factored).abs().max().item() <= 1e-12
    # relative identity: <q~_t, k~_s> depends on t - s only
    k = materialize(a.flip(1), expand_third_order(b.flip(1), c.flip(1)))

    def logits(shift):
        cs, sn = rope(positions + shift, F64)
        qr = apply_rotary(q.unflatten(-1, (c_dim, d_b)), cs, sn).flatten(-2)
        kr = apply_rotary(k.unflatten(-1, (c_dim, d_b)), cs, sn).flatten(-2)
        return torch.einsum("bqhd,bkhd->bhqk", qr, kr)

    assert (logits(0) - logits(321)).abs().max().item() <= 1e-9


@pytest.mark.parametrize("ranks", [(1, 1, 1), (6, 2, 2), (2, 3, 1)])
def test_algorithm_1_factor_path_equals_materialized(ranks):
    r_q, r_k, r_v = ranks
    bsz, seq, heads, dim = 2, 15, 34, 8
    a_q, b_q = random_factors(bsz, seq, r_q, heads, dim)
    a_k, b_k = random_factors(bsz, seq, r_k, heads, dim)
    a_v, b_v = random_factors(bsz, seq, r_v, heads, 12)
    ref = sdpa_reference(materialize(a_q, b_q), materialize(a_k, b_k), materialize(a_v, b_v))
    out = tpa_attention_factors(a_q, b_q, a_k, b_k, a_v, b_v)
    assert (out - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"factorize_q": False},
        {"contextual_a": False},
        {"contextual_b": False},
        {"share_kv_b": True, "k_rank": 2, "v_rank": 2},
        {"head_activation": "sigmoid"},
        {"head_activation": "softmax"},
        {"order": 3, "c_dim": 2},
        {"output_gate": True},
    ],
)
def test_layer_factor_impl_equals_sdpa(variant):
    """The layer's Algorithm-1 path equals its materialise-and-SDPA path for every variant."""
    kw = dict(q_rank=3, k_rank=2, v_rank=1)
    kw.update(variant)
    a = TensorProductAttention(32, 5, 16, **kw).to(F64)
    b = TensorProductAttention(32, 5, 16, attn_impl="factors", **kw).to(F64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 10, 32, dtype=F64)
    ctx = ctx_for(torch.arange(10).expand(2, 10), a.rope_dim)
    ctx.rotary = RotaryEmbedding(a.rope_dim)
    assert (a(x, ctx) - b(x, ctx)).abs().max().item() <= 1e-10
