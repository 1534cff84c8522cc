"""FlashTPA decoding kernel (tpa.ops.decode) against float64 ground truth and the reference twin.

On a machine without CUDA the kernels run under Triton's interpreter (tests/ops/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA they run compiled on the GPU.

Tolerance rule (FlashAttention's): the kernel's max error against a float64 computation must be at
most twice the max error of the same computation done in PyTorch at the input dtype, plus a tiny
absolute floor. Output buffers are poisoned with NaN before the kernels run.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from tests.ops.kernels import DEVICE, rerun_with_interpreter, skip_unless_kernels
from tpa.ops import decode_launch, tpa_decode, tpa_decode_reference
from tpa.ops.decode import (DecodeConfig, DecodeHeuristic, DecodeLaunchOptions, check_cache_seqlens, default_config,
                            resident_programs)
from tpa.ops.naive import gather_paged

# NaN in every buffer the op allocates (output, lse, split partials), so an unwritten element shows
POISON = DecodeLaunchOptions(poison_buffers=True)

needs_kernel = skip_unless_kernels("test_kernels_in_fresh_process")


# ----------------------------------------------------------------------------------------------
# Inputs and references
# ----------------------------------------------------------------------------------------------


def make_inputs(
    lengths, n, h, d, e, ranks, dtype, paged=False, page_size=16, capacity=None, seed=0, strided=False
):
    """Fresh random factors. Returns (a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table).

    Contiguous caches are [B, capacity, R, X]; ``strided`` makes them slices of a wider buffer. Paged
    caches get a shuffled block table with spare (never used) blocks."""
    g = torch.Generator().manual_seed(seed)
    r_q, r_k, r_v = ranks
    bsz = len(lengths)
    capacity = capacity or max(lengths)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    a_q, b_q = rnd(bsz, n, r_q, h), rnd(bsz, n, r_q, d)
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    if not paged:
        extra = 7 if strided else 0
        caches = [rnd(bsz, capacity + extra, r, x)[:, :capacity] for r, x in ((r_k, h), (r_k, d), (r_v, h), (r_v, e))]
        return (a_q, b_q, *caches, cache_seqlens, None)
    max_blocks = math.ceil(capacity / page_size)
    num_blocks = bsz * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: bsz * max_blocks]
    block_table = perm.reshape(bsz, max_blocks).to(torch.int32).to(DEVICE)
    caches = [rnd(num_blocks, page_size, r, x) for r, x in ((r_k, h), (r_k, d), (r_v, h), (r_v, e))]
    return (a_q, b_q, *caches, cache_seqlens, block_table)


def reference_f64(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table=None, softmax_scale=None):
    """Ground truth in float64, per sequence, with Q, K and V materialised (a formulation
    independent of the factored one). Returns out [B, N, H, E] and lse [B, N, H], float64."""
    if block_table is not None:
        a_k, b_k, a_v, b_v = (gather_paged(c, block_table) for c in (a_k, b_k, a_v, b_v))
    f = torch.float64
    a_q, b_q, a_k, b_k, a_v, b_v = (t.detach().cpu().to(f) for t in (a_q, b_q, a_k, b_k, a_v, b_v))
    bsz, n, r_q, h = a_q.shape
    d, e = b_q.shape[-1], b_v.shape[-1]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    out = torch.empty(bsz, n, h, e, dtype=f)
    lse = torch.empty(bsz, n, h, dtype=f)
    for b, length in enumerate(cache_seqlens.tolist()):
        q = torch.einsum("nrh,nrd->nhd", a_q[b], b_q[b]) / r_q
        k = torch.einsum("mrh,mrd->mhd", a_k[b, :length], b_k[b, :length]) / a_k.shape[2]
        v = torch.einsum("mrh,mre->mhe", a_v[b, :length], b_v[b, :length]) / a_v.shape[2]
        logits = torch.einsum("nhd,mhd->hnm", q, k) * scale
        limit = length - n + 1 + torch.arange(n)
        visible = torch.arange(length)[None, :] < limit[:, None]
        logits = logits.masked_fill(~visible[None], float("-inf"))
        lse[b] = torch.logsumexp(logits, dim=-1).transpose(0, 1)
        out[b] = torch.einsum("hnm,mhe->nhe", torch.softmax(logits, dim=-1), v)
    return out, lse


def torch_same_dtype(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table=None, softmax_scale=None):
    """The reference twin's computation done in PyTorch at the input dtype (no upcast), as
    FlashAttention's tests do for their tolerance; the softmax itself in float32 as there."""
    if block_table is not None:
        a_k, b_k, a_v, b_v = (gather_paged(c, block_table) for c in (a_k, b_k, a_v, b_v))
    dt = a_q.dtype
    r_q, r_k, r_v = a_q.shape[2], a_k.shape[2], a_v.shape[2]
    n, m = a_q.shape[1], a_k.shape[1]
    scale = softmax_scale if softmax_scale is not None else b_q.shape[-1] ** -0.5
    p = torch.einsum("bnrd,bmsd->bnmrs", b_q, b_k)
    logits = torch.einsum("bnrh,bmsh,bnmrs->bhnm", a_q, a_k, p) * (scale / (r_q * r_k))
    limit = cache_seqlens.long()[:, None] - n + 1 + torch.arange(n, device=a_q.device)[None, :]
    visible = torch.arange(m, device=a_q.device)[None, None, :] < limit[:, :, None]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(logits.float(), dim=-1).transpose(1, 2)
    probs = torch.softmax(logits.float(), dim=-1).to(dt)
    out = torch.einsum("bhnm,bmuh,bmue->bnhe", probs, a_v, b_v) / r_v
    return out.to(dt), lse


def max_err(x, ref):
    return (x.detach().cpu().double() - ref).abs().max().item()


FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_close_to_truth(out, lse, inputs, softmax_scale=None):
    """FlashAttention's rule for out and lse, plus: every element written (no NaN)."""
    assert not torch.isnan(out).any(), "kernel left output elements unwritten (NaN poison survived)"
    assert not torch.isnan(lse).any(), "kernel left lse elements unwritten (NaN poison survived)"
    ref_out, ref_lse = reference_f64(*inputs, softmax_scale=softmax_scale)
    pt_out, pt_lse = torch_same_dtype(*inputs, softmax_scale=softmax_scale)
    dt = out.dtype
    err, err_pt = max_err(out, ref_out), max_err(pt_out, ref_out)
    assert err <= 2 * err_pt + FLOOR[dt], f"out error {err:.3g} > 2 x PyTorch-{dt} error {err_pt:.3g} + floor"
    lerr, lerr_pt = max_err(lse, ref_lse), max_err(pt_lse, ref_lse)
    assert lerr <= 2 * lerr_pt + FLOOR[dt], f"lse error {lerr:.3g} > 2 x PyTorch-{dt} error {lerr_pt:.3g} + floor"
    # The reference twin agrees as well. Run on the same input values upcast to float32 (so that its
    # output is not rounded to the input dtype): to float32 rounding for float32 inputs, and by the
    # same rule, the twin as reference, for half precision.
    up = [t.float() if t is not None and t.is_floating_point() else t for t in inputs]
    tw_out, tw_lse = tpa_decode_reference(*up, softmax_scale=softmax_scale, return_lse=True)
    tw_out, tw_lse = tw_out.double().cpu(), tw_lse.double().cpu()
    if dt == torch.float32:
        torch.testing.assert_close(out.cpu().double(), tw_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.cpu().double(), tw_lse, rtol=1e-5, atol=1e-5)
    else:
        assert max_err(out, tw_out) <= 2 * max_err(pt_out, tw_out) + FLOOR[dt]
        assert max_err(lse, tw_lse) <= 2 * max_err(pt_lse, tw_lse) + FLOOR[dt]


# ----------------------------------------------------------------------------------------------
# Kernel against the truth
# ----------------------------------------------------------------------------------------------

# (lengths, N, H, D, E, (R_q, R_k, R_v), config). Lengths are ragged, include 1 where N=1, and are
# not multiples of any block size (16, 32, 64) or page size. Configs cover: the default heuristic,
# one split (direct write), many small splits (some empty), several head blocks, query tiles.
CASES = [
    ([1, 37, 100], 1, 34, 64, 64, (1, 1, 1), None),
    ([1, 37, 100], 1, 34, 80, 64, (2, 3, 1), DecodeConfig(block_m=16, num_splits=5)),
    ([23, 1, 71], 1, 34, 64, 80, (3, 2, 3), DecodeConfig(num_splits=1)),
    ([4, 45, 99], 4, 34, 64, 64, (3, 1, 2), DecodeConfig(block_m=16, block_h=16, num_splits=3)),
    ([4, 45, 99], 4, 34, 80, 80, (1, 2, 2), None),
    ([9, 61, 4], 4, 5, 80, 64, (2, 1, 3), DecodeConfig(block_m=16, num_splits=4)),
]


def _case_id(case):
    lengths, n, h, d, e, ranks, cfg = case
    tag = "default" if cfg is None else f"bm{cfg.block_m}-bh{cfg.block_h}-s{cfg.num_splits}"
    return f"N{n}-H{h}-D{d}-E{e}-R{''.join(map(str, ranks))}-{tag}"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel_matches_truth(case, paged, dtype):
    lengths, n, h, d, e, ranks, cfg = case
    seed = zlib.crc32(repr((lengths, n, h, d, e, ranks, paged, str(dtype))).encode())
    inputs = make_inputs(lengths, n, h, d, e, ranks, dtype, paged=paged, capacity=103, seed=seed)
    out = torch.full((len(lengths), n, h, e), float("nan"), dtype=dtype, device=DEVICE)
    res, lse = tpa_decode(*inputs, return_lse=True, backend="triton", out=out, config=cfg, options=POISON)
    assert res is out and lse.shape == (len(lengths), n, h) and lse.dtype == torch.float32
    assert_close_to_truth(out, lse, inputs)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])  # a_dot: 16-bit
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_head_factors_through_dot_match_truth(case, paged, dtype):
    """``DecodeLaunchOptions(a_dot=True)``: a_k and a_v reach each row through a one-hot ``tl.dot``
    (head blocks below 16 heads included: H = 5 in blocks of 8 with 4 queries): the same values as
    the loads give (the one-hot products are exact), and as close to the truth."""
    lengths, n, h, d, e, ranks, cfg = case
    seed = zlib.crc32(repr((lengths, n, h, d, e, ranks, paged, str(dtype))).encode())  # test_kernel_matches_truth's
    inputs = make_inputs(lengths, n, h, d, e, ranks, dtype, paged=paged, capacity=103, seed=seed)
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg,
                          options=DecodeLaunchOptions(poison_buffers=True, a_dot=True))
    loaded, loaded_lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg,
                                    options=DecodeLaunchOptions(poison_buffers=True, a_dot=False))
    assert torch.equal(out, loaded) and torch.equal(lse, loaded_lse)
    assert_close_to_truth(out, lse, inputs)


@needs_kernel
def test_kernel_strided_views_scale_and_no_lse():
    """Caches that are slices of wider buffers, a permuted (non-contiguous) query, a custom scale,
    and return_lse=False with a kernel-allocated (poisoned) output."""
    inputs = list(make_inputs([30, 77], 2, 34, 64, 64, (2, 2, 1), torch.bfloat16, capacity=90, strided=True, seed=3))
    assert not inputs[2].is_contiguous()
    inputs[0] = inputs[0].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not inputs[0].is_contiguous()
    out = tpa_decode(*inputs, softmax_scale=0.3, backend="triton", config=DecodeConfig(block_m=32), options=POISON)
    assert out.shape == (2, 2, 34, 64) and out.dtype == torch.bfloat16
    _, lse = tpa_decode(*inputs, softmax_scale=0.3, return_lse=True, backend="triton", options=POISON)
    assert_close_to_truth(out, lse, inputs, softmax_scale=0.3)


@needs_kernel
@pytest.mark.parametrize(("scale", "dtype"), [(-12.0, torch.bfloat16), (-0.4, torch.float32), (0.0, torch.float32),
                                            (0.7, torch.float32)], ids=["-12-bf16", "-0.4", "0", "0.7"])
@pytest.mark.parametrize(("lengths", "n", "splits"), [([16, 47, 96], 3, 2), ([64, 33, 80], 1, 3)])
def test_split_ends_and_causal_limits_at_any_scale(scale, dtype, lengths, n, splits):
    """Splits that end in a whole block, in a partial one, and at the causal limits of 3 queries, with a
    negative scale (at -12 the scaled logits of a block span more than float32's exponent range, so a
    running maximum taken on the wrong side overflows exp2), zero (uniform weights) and a positive one.
    The logits of scale -12 are checked in bfloat16, whose error bounds allow for their size."""
    inputs = make_inputs(lengths, n, 34, 64, 64, (2, 2, 1), dtype, capacity=96, seed=int(scale * 10) + n)
    out, lse = tpa_decode(*inputs, softmax_scale=scale, return_lse=True, backend="triton",
                          config=DecodeConfig(block_m=16, num_splits=splits), options=POISON)
    assert_close_to_truth(out, lse, inputs, softmax_scale=scale)


@needs_kernel
def test_split_count_does_not_change_the_result():
    """The same inputs with 1, 2 and 7 splits agree to float32 rounding (the LSE merge is exact)."""
    inputs = make_inputs([50, 3], 1, 34, 64, 64, (2, 1, 1), torch.float32, seed=5)
    outs = [
        tpa_decode(*inputs, return_lse=True, backend="triton", config=DecodeConfig(block_m=16, num_splits=s))
        for s in (1, 2, 7)
    ]
    for o, l in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l, outs[0][1], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_more_than_256_splits_merge_exactly():
    """300 splits (a merge block of 512, beyond the heuristic's default cap): the output as close to
    the float64 truth as PyTorch's float32 is (FlashAttention's rule); the log-sum-exp, merged from
    300 float32 partials in the log2 domain, within 8 float32 ulps of its largest magnitude (PyTorch's
    single-pass logsumexp is within 1). The empty splits of the shorter sequence merge to nothing."""
    inputs = make_inputs([4800, 700], 1, 16, 32, 32, (1, 1, 1), torch.float32, seed=6)
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=DecodeConfig(block_m=16, num_splits=300))
    ref_out, ref_lse = reference_f64(*inputs)
    pt_out, _ = torch_same_dtype(*inputs)
    assert max_err(out, ref_out) <= 2 * max_err(pt_out, ref_out) + FLOOR[torch.float32]
    assert max_err(lse, ref_lse) <= 8 * torch.finfo(torch.float32).eps * ref_lse.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("program_bytes", [64, 2048, 1 << 30], ids=["slabs-of-16", "slabs-of-64", "whole-rows"])
def test_split_merge_in_column_slabs_matches_the_truth(program_bytes):
    """The merge of a row by several programs, each a slab of its columns
    (``DecodeHeuristic.merge_program_bytes``): E = 80 in a 128-column block, so slabs of 16 leave the
    last three past E, and of 64 one half past it; ragged lengths with empty splits, the log-sum-exp
    written by the first slab only; every element written (poisoned buffers), as exact as whole rows."""
    inputs = make_inputs([1, 37, 100], 1, 5, 64, 80, (2, 1, 2), torch.float32, seed=11)  # 5 heads: a short interpreter run
    options = DecodeLaunchOptions(heuristic=DecodeHeuristic(merge_program_bytes=program_bytes), poison_buffers=True)
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=DecodeConfig(block_m=16, num_splits=5),
                          options=options)
    assert_close_to_truth(out, lse, inputs)


@needs_kernel
def test_timeline_needs_cuda_tensors():
    """The profiling hook reads the GPU's clock: on CPU tensors (the interpreter) it is refused."""
    inputs = [t if t is None else t.cpu() for t in make_inputs([5, 9], 1, 16, 32, 32, (1, 1, 1), torch.float32)]
    with pytest.raises(ValueError, match="timeline.*CUDA"):
        tpa_decode(*inputs, backend="triton", options=DecodeLaunchOptions(timeline=True))


@pytest.mark.parametrize(("block_e", "splits", "slab"), [
    (64, 128, 64), (64, 129, 32), (64, 256, 32), (64, 512, 16), (64, 1024, 16), (128, 64, 128), (128, 65, 64),
    (16, 1024, 16), (256, 1, 256),
])
def test_merge_slabs_keep_each_program_within_its_bytes(block_e, splits, slab):
    """32 KB of float32 partials per merge program at most, down to slabs of 16 columns."""
    assert decode_launch.merge_slab(block_e, splits, DecodeHeuristic().merge_program_bytes) == slab


def test_kernels_in_fresh_process():
    """When triton was imported (by another test module) before TRITON_INTERPRET=1 could be set,
    the kernel tests above are skipped here and run in a fresh interpreter process instead."""
    rerun_with_interpreter(__file__, "kernel or split")


# ----------------------------------------------------------------------------------------------
# Dispatch, defaults, launch parameters
# ----------------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_is_the_reference_twin():
    """On CPU tensors backend='auto' falls back to the twin (documented)."""
    inputs = make_inputs([5, 12], 2, 6, 32, 48, (3, 2, 2), torch.float32, seed=7)
    inputs = tuple(t.cpu() if t is not None else None for t in inputs)
    out, lse = tpa_decode(*inputs, return_lse=True)
    ref_out, ref_lse = tpa_decode_reference(*inputs, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    buf = torch.full_like(ref_out, float("nan"))
    assert tpa_decode(*inputs, backend="reference", out=buf) is buf and torch.equal(buf, ref_out)


def test_default_config_depends_on_shapes_only():
    """The launch parameters are a function of shapes and capacity; the split count is bounded."""
    cfg = default_config(1, 1, 32, 64, 64, capacity=4096, num_sms=132)
    assert cfg.num_splits > 1 and cfg.block_h == 32 and cfg.block_n == 1
    assert default_config(1, 1, 32, 64, 64, capacity=4096, num_sms=132) == cfg
    big = default_config(16, 1, 48, 64, 64, capacity=1 << 19, num_sms=132)
    assert 1 <= big.num_splits <= 256
    tiny = default_config(2, 1, 34, 80, 80, capacity=10, num_sms=132)
    assert tiny.num_splits == 1  # never more splits than blocks of capacity
    wide = default_config(1, 1, 78, 256, 256, capacity=4096, num_sms=132)
    assert wide.block_h * wide.block_n * 256 <= 16384


# (B, capacity, H, ranks) -> (splits, warps): the H200 sweep of benchmarks/dev/decode_waves.py
# (2026-12-02, BENCHMARKS.md "one wave of latency-bound programs"): the default launch and, where the
# old one made 512 programs of two blocks, the 256 programs of four blocks that beat it
WAVE_CASES = {
    (1, 32768, 32, (16, 1, 1)): (256, 4), (2, 16384, 32, (16, 1, 1)): (128, 4),
    (2, 32768, 32, (16, 1, 1)): (128, 2), (4, 16384, 32, (16, 1, 1)): (64, 2), (8, 8192, 32, (16, 1, 1)): (32, 2),
    (2, 65536, 32, (16, 1, 1)): (256, 2), (8, 16384, 32, (16, 1, 1)): (64, 2), (16, 8192, 32, (16, 1, 1)): (32, 2),
    (1, 32768, 34, (6, 2, 2)): (256, 4), (8, 32768, 34, (6, 2, 2)): (32, 4),
}


@pytest.mark.parametrize("point", list(WAVE_CASES), ids=str)
def test_latency_bound_grids_fit_one_wave(point):
    """Programs of at most two cache blocks (4 warps, two per SM at a time) fill at most 2 x 132 SMs;
    longer programs keep the target of 4 per SM."""
    bsz, capacity, h, (_, r_k, r_v) = point
    cfg = default_config(bsz, 1, h, 64, 64, capacity, 132, 2, None, r_k, r_v)
    assert (cfg.num_splits, cfg.num_warps) == WAVE_CASES[point]
    programs = bsz * cfg.num_splits * -(-h // cfg.block_h)
    blocks = -(-capacity // cfg.block_m)
    assert blocks > 2 * cfg.num_splits or programs <= 2 * 132


# (B, capacity, H, ranks) -> splits: the fastest of the default's, one wave's, two waves' and three
# waves' split counts in the H200 sweep `decode_waves.py --occupancy` (2026-12-02, BENCHMARKS.md "whole
# waves"), where the choice mattered by more than 1%; 4-warp programs (two per SM) and 2-warp ones (four)
MEASURED_BEST_SPLITS = {
    (8, 32768, 34, (6, 2, 2)): 32, (8, 131072, 34, (6, 2, 2)): 33, (16, 32768, 34, (6, 2, 2)): 16,
    (16, 524288, 34, (6, 2, 2)): 33, (2, 131072, 32, (6, 2, 2)): 128, (4, 32768, 32, (16, 2, 2)): 64,
    (4, 131072, 34, (16, 1, 1)): 64, (2, 524288, 34, (16, 1, 1)): 131, (16, 524288, 34, (16, 1, 1)): 33,
    (8, 32768, 32, (16, 1, 1)): 64, (4, 131072, 32, (16, 1, 1)): 128, (16, 32768, 32, (16, 1, 1)): 32,
}


@pytest.mark.parametrize("point", list(MEASURED_BEST_SPLITS), ids=str)
def test_splits_fill_whole_waves_of_resident_programs(point):
    """The split count fills one wave of the programs the SMs hold at once (two waves where one would
    leave more slots idle), the fastest measured; the old rule (4 programs per SM) stays selectable.
    The split counts were measured with the blocks of before the rank-4 half blocks (2026-12-02)."""
    bsz, capacity, h, (_, r_k, r_v) = point
    blocks_then = DecodeHeuristic(rank_four_half_blocks=False)
    cfg = default_config(bsz, 1, h, 64, 64, capacity, 132, 2, None, r_k, r_v, heuristic=blocks_then)
    assert cfg.num_splits == MEASURED_BEST_SPLITS[point]
    slots = resident_programs(cfg.num_warps) * 132
    assert bsz * cfg.num_splits * -(-h // cfg.block_h) <= 2 * slots


@pytest.mark.parametrize(("capacity", "h", "ranks", "splits"), [
    (524288, 32, (1, 1), 512),  # 16 blocks each: one wave of 2-warp programs at batch 1 (66.8 against 77.0 us)
    (131072, 32, (1, 1), 256),  # 4 blocks each would be slower (31.4 against 30.3 us): the cap holds
    (524288, 34, (2, 2), 261),  # one wave of 4-warp programs, 63 blocks each
    (32832, 34, (2, 2), 206),  # generate()'s decode shape at batch 1 (5 blocks each: unchanged)
])
def test_long_splits_go_past_the_cap_at_batch_one(capacity, h, ranks, splits):
    """Beyond 256 splits only where each keeps 16 blocks (H200 sweep, 2026-12-02)."""
    cfg = default_config(1, 1, h, 64, 64, capacity, 132, 2, None, *ranks)
    assert cfg.num_splits == splits
    with pytest.raises(ValueError, match="long_split_blocks"):
        DecodeHeuristic(long_split_blocks=0)


@pytest.mark.parametrize(("bsz", "capacity", "h", "warps", "splits"), [
    (1, 65536, 16, 4, 256),  # H200, 2026-12-03: 4 warps faster than 2 at the same split count
    (1, 131072, 16, 4, 256),
    (1, 262144, 16, 4, 256),
    (1, 524288, 16, 2, 512),  # two waves of 4-warp programs: as before (not measured)
    (2, 131072, 16, 2, 256),  # 4 warps slower here (39.8 against 34.3 us): as before
    (1, 131072, 32, 2, 256),  # 32-row tiles: 4 warps 3% slower at 64-token blocks; as before
])
def test_sixteen_row_tiles_of_one_sequence_get_four_warps(bsz, capacity, h, warps, splits):
    cfg = default_config(bsz, 1, h, 64, 64, capacity, 132, 2, None, 1, 1)
    assert (cfg.num_warps, cfg.num_splits) == (warps, splits)
    explicit = default_config(1, 1, 16, 64, 64, 131072, 132, 2, DecodeConfig(num_warps=2), 1, 1)
    assert explicit.num_warps == 2  # an explicit choice stands


@pytest.mark.parametrize(("bsz", "capacity", "h", "ranks", "launch"), [
    (2, 131072, 32, (6, 2, 2), (32, 2, 256)),  # H200, 2026-12-03: 65.3 -> 61.7 us back to back
    (8, 32768, 32, (16, 2, 2), (32, 2, 64)),
    (16, 524288, 32, (6, 2, 2), (32, 2, 33)),
    (1, 131072, 32, (6, 2, 2), (64, 4, 256)),  # one sequence: half blocks slower (42.9 against 37.6 us)
    (4, 4096, 32, (6, 2, 2), (64, 4, 32)),  # short caches: as before
    (8, 32768, 32, (16, 1, 1), (64, 2, 64)),  # rank 2: as before
    (8, 32768, 32, (6, 2, 1), (64, 4, 32)),  # rank 3: not measured, as before
    (8, 32768, 34, (6, 2, 2), (32, 4, 32)),  # 64-row tiles: 32-token blocks from shared memory already
])
def test_rank_four_caches_of_thirty_two_rows_take_half_blocks(bsz, capacity, h, ranks, launch):
    cfg = default_config(bsz, 1, h, 64, 64, capacity, 132, 2, None, ranks[1], ranks[2])
    assert (cfg.block_m, cfg.num_warps, cfg.num_splits) == launch
    off = DecodeHeuristic(rank_four_half_blocks=False)
    assert default_config(2, 1, 32, 64, 64, 131072, 132, 2, None, 2, 2, heuristic=off).block_m == 64
    explicit = default_config(2, 1, 32, 64, 64, 131072, 132, 2, DecodeConfig(block_m=64), 2, 2)
    assert (explicit.block_m, explicit.num_warps) == (64, 4)  # an explicit block stands


def test_the_old_split_rule_stays_selectable():
    """``splits="programs"`` aims at ``programs_per_sm`` programs per SM, as before (the sweep's old
    default at the small preset's decode shape: 64 splits of 8 sequences, two waves)."""
    old = DecodeHeuristic(splits="programs")
    assert default_config(8, 1, 34, 64, 64, 32768, 132, 2, None, 2, 2, heuristic=old).num_splits == 64
    assert default_config(8, 1, 34, 64, 64, 32768, 132, 2, None, 2, 2).num_splits == 32
    with pytest.raises(ValueError, match="splits must be"):
        DecodeHeuristic(splits="many")


@pytest.mark.parametrize(("h", "ranks", "element_size", "block_m", "stages"), [
    (34, (2, 2), 2, 32, 3),  # small's TPA: 64-row tiles; 3 stages of 64 tokens do not fit
    (78, (2, 2), 2, 32, 3),
    (78, (2, 2), 4, 16, 2),  # float32: 3 stages do not fit even at 32 tokens
    (32, (2, 2), 2, 32, 3),  # 64 tokens would fit; the rank-4 half blocks (above) take 32
    (32, (1, 1), 2, 64, 3),
])
def test_shared_memory_keeps_three_stages_of_half_blocks(h, ranks, element_size, block_m, stages):
    """Where the staged tiles overflow shared memory, the pipeline keeps 3 stages with blocks of 32
    tokens before it drops to 2 stages; the staged tiles then fit the 160 KB budget."""
    cfg = default_config(8, 1, h, 64, 64, 32768, 132, element_size, None, *ranks)
    assert (cfg.block_m, cfg.num_stages) == (block_m, stages)
    rows = cfg.block_h * cfg.block_n
    assert cfg.num_stages * cfg.block_m * sum(r * (64 + rows) for r in ranks) * element_size <= 160 * 1024


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _good():
    return list(make_inputs([5, 9], 1, 4, 32, 32, (2, 1, 2), torch.float32, capacity=12, seed=11))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda x: x.__setitem__(1, x[1][:, :, :1]), ValueError, "b_q"),  # R_q mismatch
        (lambda x: x.__setitem__(2, x[2][..., :3]), ValueError, "head count"),  # H mismatch
        (lambda x: x.__setitem__(3, x[3][..., :16]), ValueError, "feature dim"),  # D mismatch
        (lambda x: x.__setitem__(4, x[4][:1]), ValueError, "first two dimensions"),  # batch mismatch
        (lambda x: x.__setitem__(5, x[5][:, :, :1]), ValueError, "R_v"),  # R_v mismatch
        (lambda x: x.__setitem__(2, x[2][:, :, :, :, None]), ValueError, "4 dimensions"),
        (lambda x: x.__setitem__(6, x[6].long()), TypeError, "int32"),  # wrong dtype of cache_seqlens
        (lambda x: x.__setitem__(6, x[6].float()), TypeError, "int32"),
        (lambda x: x.__setitem__(6, x[6][:1]), ValueError, "shape"),
        # the kernel reads lengths at unit stride: a strided view would be read wrong, so it is refused
        (lambda x: x.__setitem__(6, torch.stack([x[6], x[6] + 1], 1)[:, 0]), ValueError,
         "cache_seqlens must be contiguous"),
        (lambda x: x.__setitem__(6, torch.tensor([5, 13], dtype=torch.int32)), ValueError, "exceeds the cache capacity"),
        (lambda x: x.__setitem__(6, torch.tensor([0, 9], dtype=torch.int32)), ValueError, "smaller than the number"),
        (lambda x: x.__setitem__(3, x[3].double()), TypeError, "dtype"),
        (lambda x: x.__setitem__(0, x[0].half()), TypeError, "dtype"),
        (lambda x: x.__setitem__(0, [1, 2]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises(mutate, exc, match):
    args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in _good()[:7]]
    mutate(args)
    with pytest.raises(exc, match=match):
        tpa_decode(*args, backend="reference")


def test_bad_paged_input_raises():
    args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in make_inputs(
        [5, 9], 1, 4, 32, 32, (1, 1, 1), torch.float32, paged=True, page_size=4, capacity=12, seed=2)]
    tpa_decode(*args[:7], block_table=args[7], backend="reference")  # the good call works
    with pytest.raises(TypeError, match="block_table must be int32"):
        tpa_decode(*args[:7], block_table=args[7].long())
    with pytest.raises(ValueError, match="block_table must be"):
        tpa_decode(*args[:7], block_table=args[7][:1])
    with pytest.raises(ValueError, match="exceeds the cache capacity"):  # capacity = 3 blocks x 4
        tpa_decode(*args[:6], torch.tensor([5, 13], dtype=torch.int32), block_table=args[7])
    with pytest.raises(ValueError, match="rows must be contiguous"):  # same values, column stride 2
        tpa_decode(*args[:7], block_table=args[7].t().contiguous().t())
    bad_table = args[7].clone()
    bad_table[1, 0] = 1000
    with pytest.raises(ValueError, match="outside"):
        tpa_decode(*args[:7], block_table=bad_table)


def test_other_bad_arguments():
    args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in _good()[:7]]
    with pytest.raises(ValueError, match="backend"):
        tpa_decode(*args, backend="cuda")
    with pytest.raises(ValueError, match="out must be"):
        tpa_decode(*args, out=torch.empty(2, 1, 4, 31))
    with pytest.raises(ValueError, match="do not fit"):
        a_q, b_q = torch.randn(2, 13, 2, 4), torch.randn(2, 13, 2, 32)
        tpa_decode(a_q, b_q, *args[2:7])
    with pytest.raises(ValueError, match="exceeds"):
        check_cache_seqlens(torch.tensor([3, 40], dtype=torch.int32), capacity=12, num_queries=1)
    check_cache_seqlens(torch.tensor([3, 12], dtype=torch.int32), capacity=12, num_queries=3)  # valid
    # check_lengths=False skips the value check (what a CUDA caller gets by default: no host sync).
    out = tpa_decode(*args[:6], torch.tensor([5, 9], dtype=torch.int32), check_lengths=False)
    assert out.shape == (2, 1, 4, 32)
