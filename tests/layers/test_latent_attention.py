"""MLA's absorbed decode (tpa.layers.mla.latent_attention) against attention over the concatenated
latent key ``[c_kv, k_rope]`` (the formulation it replaces), and the static-step SDPA call."""

from __future__ import annotations

import pytest
import torch

from tpa.layers.base import attend
from tpa.layers.mla import latent_attention


def _concat_reference(q_latent, q_rope, c_kv, k_rope, mask, scale):
    """float64 attention with one latent head shared by all heads: key [c_kv, k_rope], value c_kv."""
    f = torch.float64
    query = torch.cat([q_latent, q_rope], dim=-1).to(f)
    key = torch.cat([c_kv, k_rope], dim=-1).to(f)[:, :, None]
    return attend(query, key, c_kv.to(f)[:, :, None], mask, scale=scale)


@pytest.mark.parametrize("seq, masked", [(1, False), (1, True), (5, False), (5, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_latent_attention_matches_concatenated_keys(seq, masked, dtype):
    g = torch.Generator().manual_seed(seq * 10 + masked)
    bsz, heads, d_c, d_r, length = 3, 5, 48, 16, 37
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q_latent, q_rope = rnd(bsz, seq, heads, d_c), rnd(bsz, seq, heads, d_r)
    # the cache as a model holds it: slices of wider buffers
    c_kv, k_rope = rnd(bsz, length + 4, d_c)[:, :length], rnd(bsz, length + 4, d_r)[:, :length]
    mask = None
    if masked:  # ragged lengths, causal within the new tokens
        lengths = torch.tensor([length, 20, seq])
        slots = lengths[:, None] - seq + torch.arange(seq)[None, :]
        mask = torch.arange(length)[None, None, :] <= slots[:, :, None]
    scale = (d_c + d_r) ** -0.5
    got = latent_attention(q_latent, q_rope, c_kv, k_rope, mask, scale)
    ref = _concat_reference(q_latent, q_rope, c_kv, k_rope, mask, scale)
    assert got.shape == (bsz, seq, heads, d_c) and got.dtype == dtype
    # the same computation in PyTorch at the input dtype bounds the error (twice its error, plus a floor)
    same_dtype = attend(torch.cat([q_latent, q_rope], -1), torch.cat([c_kv, k_rope], -1)[:, :, None],
                        c_kv[:, :, None], mask, scale=scale)
    err = (got.double() - ref).abs().max().item()
    err_pt = (same_dtype.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + {torch.float32: 1e-6, torch.bfloat16: 1e-3}[dtype]


def test_static_step_attention_is_the_same_call():
    """``fixed_shapes`` only lifts the backend restriction: same numbers on a grouped masked step."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 1, 6, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g)
    mask = torch.arange(9)[None, None, :] < torch.tensor([4, 9])[:, None, None]
    torch.testing.assert_close(attend(q, k, v, mask, fixed_shapes=True), attend(q, k, v, mask), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_latent_attention_on_gpu(dtype):
    """On CUDA the 16-bit score products come out of the GEMM in float32: the same error rule."""
    g = torch.Generator().manual_seed(1)
    bsz, seq, heads, d_c, d_r, length = 4, 1, 12, 256, 32, 4099
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).cuda()  # noqa: E731
    q_latent, q_rope, c_kv, k_rope = rnd(bsz, seq, heads, d_c), rnd(bsz, seq, heads, d_r), rnd(bsz, length, d_c), \
        rnd(bsz, length, d_r)
    mask = (torch.arange(length)[None, None, :] < torch.tensor([length, 7, 1000, 1])[:, None, None]).cuda()
    scale = (d_c + d_r) ** -0.5
    got = latent_attention(q_latent, q_rope, c_kv, k_rope, mask, scale)
    ref = _concat_reference(q_latent, q_rope, c_kv, k_rope, mask, scale)
    same_dtype = attend(torch.cat([q_latent, q_rope], -1).float(), torch.cat([c_kv, k_rope], -1).float()[:, :, None],
                        c_kv.float()[:, :, None], mask, scale=scale).to(dtype)
    err = (got.double() - ref).abs().max().item()
    assert err <= 2 * (same_dtype.double() - ref).abs().max().item() + 1e-3
