"""GQA/MQA decoding through the FlashTPA kernel (tpa.ops.grouped_decode, interpreted on CPU) equals
SDPA attention over the valid cache slots, on awkward shapes and ragged lengths."""

import pytest
import torch

from tpa.layers.base import attend
from tpa.ops.grouped_decode import grouped_decode, supports

pytest.importorskip("triton")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("bsz,new,heads,groups,dim,lengths,dtype", [
    (1, 1, 22, 2, 64, [37], torch.float32),       # the small preset's GQA
    (3, 1, 34, 1, 80, [1, 50, 17], torch.float32),  # MQA, ragged, a head size of 80
    (2, 3, 6, 3, 32, [9, 33], torch.float32),     # three new tokens (speculative / chunked step)
    (2, 1, 12, 4, 64, [64, 5], torch.bfloat16),
])
def test_grouped_decode_equals_sdpa_over_the_valid_slots(bsz, new, heads, groups, dim, lengths, dtype):
    gen = torch.Generator().manual_seed(hash((bsz, new, heads, groups, dim)) % 2**31)
    capacity = max(lengths) + 7
    q = torch.randn(bsz, new, heads, dim, generator=gen).to(dtype)
    k = torch.randn(bsz, capacity, groups, dim, generator=gen).to(dtype)
    v = torch.randn(bsz, capacity, groups, dim, generator=gen).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    got = grouped_decode(q, k, v, seqlens, backend="triton")
    for b, length in enumerate(lengths):
        slots = torch.arange(length)
        mask = slots[None, :] <= torch.arange(new)[:, None] + length - new  # causal, aligned to the end
        want = attend(q[b:b + 1].double(), k[b:b + 1, :length].double(), v[b:b + 1, :length].double(), mask[None])
        err = (got[b:b + 1].double() - want).norm() / want.norm()
        assert err < TOL[dtype], (b, float(err))


def test_grouped_decode_reads_the_cache_in_place_and_checks_shapes():
    q = torch.randn(1, 1, 4, 16)
    k = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="must divide"):
        grouped_decode(q, k, k, torch.tensor([4], dtype=torch.int32), backend="triton")
    assert supports(22, 2, 64) and supports(34, 1, 64)
    assert not supports(12, 12, 64)  # MHA stays on SDPA
    assert not supports(78, 6, 64)   # the query tile would outgrow the kernel's registers


def test_grouped_decode_loads_its_head_factors():
    """GQA/MQA keep the plain loads of the head factors (the path their decode figures were measured
    with): the plan of a bf16 call has A_DOT off, where a TPA call's default has it on."""
    from tpa.ops import decode_launch

    q = torch.randn(1, 1, 4, 16).bfloat16()
    k = torch.randn(1, 8, 2, 16).bfloat16()
    decode_launch.clear_plans()
    grouped_decode(q, k, k, torch.tensor([5], dtype=torch.int32), backend="triton")
    (entry,) = decode_launch.PLANS.values()
    assert entry.plan.split_constexprs["A_DOT"] is False


@pytest.mark.gpu
@pytest.mark.parametrize("heads,groups", [(22, 2), (34, 1), (32, 8)])
def test_grouped_decode_on_gpu_long_ragged_caches(heads, groups):
    gen = torch.Generator().manual_seed(heads * 100 + groups)
    lengths, capacity, dim = [4097, 1500], 4200, 64
    q = torch.randn(2, 1, heads, dim, generator=gen).bfloat16().cuda()
    k = torch.randn(2, capacity, groups, dim, generator=gen).bfloat16().cuda()
    v = torch.randn(2, capacity, groups, dim, generator=gen).bfloat16().cuda()
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    got = grouped_decode(q, k, v, seqlens)
    graph_out = torch.empty_like(got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out.copy_(grouped_decode(q, k, v, seqlens))
    graph.replay()
    assert torch.equal(graph_out, got)
    for b, length in enumerate(lengths):
        want = attend(q[b:b + 1].double(), k[b:b + 1, :length].double(), v[b:b + 1, :length].double(), None)
        err = (got[b:b + 1].double() - want).norm() / want.norm()
        assert err < TOL[torch.bfloat16], (b, float(err))
