"""The decode benchmark's MLA baseline computes MLA's absorbed attention (checked on CPU against
float64 attention over the concatenated latent key), and counts the bytes it must move."""

import torch

from tpa.bench.decode.inputs import mla_bytes, mla_decode_fn


def test_mla_baseline_is_latent_attention_over_the_whole_cache():
    torch.manual_seed(0)
    fn, nbytes, (q_latent, q_rope, c_kv, k_rope) = mla_decode_fn(torch, 2, 37, 5, torch.float32, d_c=16, d_r=4,
                                                                  device="cpu")
    got = fn()
    keys = torch.cat([c_kv, k_rope], dim=-1).double()  # [B, L, d_c + d_R]
    queries = torch.cat([q_latent, q_rope], dim=-1).double()  # [B, 1, H, d_c + d_R]
    scores = torch.einsum("bthx,blx->bthl", queries, keys) * (16 + 4) ** -0.5
    want = torch.einsum("bthl,blc->bthc", scores.softmax(-1), c_kv.double())
    assert got.shape == (2, 1, 5, 16)
    assert (got.double() - want).norm() / want.norm() < 1e-5
    assert nbytes == mla_bytes(2, 37, 5, 4, 16, 4) == (2 * 37 * 20 + 2 * 5 * 36) * 4
