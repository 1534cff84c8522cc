"""The kernels compiled on a GPU at the sizes only a GPU reaches: long and paged decode caches, CUDA
graphs replayed at other cache lengths, the fused Q/K/V op at the ``small`` preset's training shapes,
eager and under ``torch.compile`` with both registrations. The same tolerance rules as the CPU tests
(the helpers of tests/ops/test_decode.py and test_materialize.py: FlashAttention's rule against a
float64 truth, outputs poisoned with NaN first). Run with ``python -m pytest -m gpu``."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.ops import test_decode as dec
from tests.ops import test_materialize as mat
from tpa.ops import fused_materialize as materialize_mod
from tpa.ops import tpa_decode, tpa_materialize_many
from tpa.ops.naive import materialize as materialize_reference

pytestmark = pytest.mark.gpu

# (lengths, N, H, D, ranks, dtype, page size or None): caches up to 33,000 tokens, odd head counts and
# feature sizes, N > 1 queries, paged caches; these were the checks of `tpa bench decode`.
DECODE_CASES = [
    ([1, 37, 1000, 4096], 1, 32, 64, (16, 1, 1), torch.bfloat16, None),
    ([1, 37, 1000, 4096], 1, 32, 64, (6, 2, 2), torch.bfloat16, None),
    ([1, 999, 33000], 1, 32, 64, (6, 2, 2), torch.bfloat16, None),  # rank-4 half blocks (capacity >= 32K)
    ([5, 999, 3001], 1, 34, 80, (3, 2, 3), torch.float16, None),
    ([5, 999, 3001], 4, 78, 64, (2, 1, 2), torch.bfloat16, 16),
    ([7, 1500], 1, 78, 256, (1, 2, 1), torch.bfloat16, None),
    ([9, 700, 2049], 4, 34, 80, (3, 3, 1), torch.float32, None),
    ([9, 700, 2049], 1, 48, 64, (16, 1, 1), torch.float32, 256),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"L{max(c[0])}-N{c[1]}-H{c[2]}-D{c[3]}-R{c[4]}-"
                                                            f"{str(c[5])[6:]}-paged{c[6]}")
@pytest.mark.parametrize("a_dot", [False, True], ids=["a-loads", "a-dot"])
def test_decode_long_caches_match_truth(case, a_dot):
    """Also with the head factors through a one-hot ``tl.dot`` (``DecodeLaunchOptions.a_dot``)."""
    from tpa.ops.decode import DecodeLaunchOptions

    lengths, n, h, d, ranks, dtype, page = case
    seed = zlib.crc32(repr(case).encode())
    inputs = dec.make_inputs(lengths, n, h, d, d, ranks, dtype, paged=page is not None, page_size=page or 16,
                             capacity=max(lengths) + 5, seed=seed)
    out = torch.full((len(lengths), n, h, d), float("nan"), dtype=dtype, device="cuda")
    _, lse = tpa_decode(*inputs[:7], block_table=inputs[7], return_lse=True, backend="triton", out=out,
                        options=DecodeLaunchOptions(a_dot=a_dot))
    dec.assert_close_to_truth(out, lse, inputs)


@pytest.mark.parametrize(("h", "block_h", "pad", "inner"),
                         [(34, 16, 1, True), (34, 32, 16, False), (34, 64, 8, False), (78, 32, 16, True)])
@pytest.mark.parametrize("a_dot", [False, True], ids=["a-loads", "a-dot"])
def test_decode_forced_head_blocks_and_padded_a_rows_match_truth(h, block_h, pad, inner, a_dot):
    """Compiled: forced head blocks (the last one partly masked) and A caches padded to a multiple of
    ``pad`` heads, NaN in the padding, read by the loads (a_head_pad), at caches of thousands of
    tokens, in both grid orders (heads_inner)."""
    from tests.ops.test_decode_block_h import _padded
    from tpa.ops.decode import DecodeConfig, DecodeLaunchOptions

    inputs = list(dec.make_inputs([5, 999, 3001], 2, h, 64, 64, (6, 2, 2), torch.bfloat16, capacity=3010,
                                  seed=zlib.crc32(repr((h, block_h, pad)).encode())))
    heads = -(-h // pad) * pad
    padded = list(inputs)
    padded[2], padded[4] = _padded(inputs[2], heads, float("nan")), _padded(inputs[4], heads, float("nan"))
    options = DecodeLaunchOptions(poison_buffers=True, a_head_pad=pad, heads_inner=inner, a_dot=a_dot)
    out, lse = tpa_decode(*padded[:7], return_lse=True, backend="triton", config=DecodeConfig(block_h=block_h),
                          options=options)
    dec.assert_close_to_truth(out, lse, inputs)


@pytest.mark.parametrize("inner", [False, True], ids=["splits-outer", "heads-inner"])
def test_decode_timeline_records_every_program_and_changes_nothing(inner):
    """The profiling hook (DecodeLaunchOptions.timeline): the output still matches the truth, and
    every program of the split grid stored its clock in order (start <= queries <= loop <= end, all
    set) and an SM of this GPU."""
    from tpa.ops import decode_launch
    from tpa.ops.decode import DecodeConfig, DecodeLaunchOptions

    inputs = dec.make_inputs([5, 999, 3001], 1, 34, 64, 64, (6, 2, 2), torch.bfloat16, seed=21)
    decode_launch.clear_plans()
    options = DecodeLaunchOptions(poison_buffers=True, timeline=True, heads_inner=inner)
    out, lse = tpa_decode(*inputs[:7], return_lse=True, backend="triton", config=DecodeConfig(block_h=16, num_splits=7),
                          options=options)
    dec.assert_close_to_truth(out, lse, inputs[:7])
    (entry,) = decode_launch.PLANS.values()
    times = entry.plan.times.cpu()
    assert times.shape == (3 * 3 * 7, 5)  # 3 head blocks x 3 sequences x 7 splits
    assert (times[:, 0] > 0).all() and (times[:, :4].diff(dim=1) >= 0).all()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert ((times[:, 4] >= 0) & (times[:, 4] < sms)).all()


def _a_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t [B, M, R, H]`` with the same values in another layout of its head-factor rows."""
    b, m, r, h = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "wider":  # buf[..., :H] of rows of H + 6 heads
        buf = torch.full((b, m, r, h + 6), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., :h] = t
        return buf[..., :h]
    if layout == "offset":  # one element past an aligned start: the base pointer is misaligned
        flat = torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype, device=t.device)
        view = flat[1:].view(b, m, r, h)
        view.copy_(t)
        return view
    assert layout == "rank_major"
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "wider", "offset", "rank_major"])
@pytest.mark.parametrize("h", [34, 35, 40, 78])
def test_decode_a_rows_of_any_alignment_match_truth(h, layout):
    """Compiled: the A caches' row starts aligned to 1, 2, 8 or 16 elements (H and the layout set
    it; the kernel's A_ALIGN hint widens its loads to match), and a misaligned base pointer."""
    from tpa.ops import decode_launch

    inputs = list(dec.make_inputs([5, 999, 3001], 1, h, 64, 64, (6, 2, 2), torch.bfloat16, capacity=3010,
                                  seed=zlib.crc32(repr((h, layout)).encode())))
    inputs[2], inputs[4] = _a_layout(inputs[2], layout), _a_layout(inputs[4], layout)
    assert decode_launch.a_row_alignment(inputs[2], inputs[4]) >= 1
    out = torch.full((3, 1, h, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    _, lse = tpa_decode(*inputs[:7], return_lse=True, backend="triton", out=out)
    dec.assert_close_to_truth(out, lse, inputs)


def test_decode_cuda_graph_replays_at_other_lengths():
    """A graph captured at one cache length replays correctly at others (the lengths live in a
    device buffer): bitwise the eager result."""
    inputs = dec.make_inputs([4096, 4096], 1, 32, 64, 64, (16, 1, 1), torch.bfloat16, capacity=8192)
    seqlens = inputs[6]
    out = torch.empty(2, 1, 32, 64, dtype=torch.bfloat16, device="cuda")
    tpa_decode(*inputs[:7], out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tpa_decode(*inputs[:7], out=out)
    for lengths in ([4096, 100], [8192, 1], [3, 5000]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        assert torch.equal(out, tpa_decode(*inputs[:7])), lengths


# The `small` preset's Q, K and V factors (34 heads, head_dim 64, ranks 6, 2, 2) at a shorter batch.
SMALL_QKV = [(4, 1024, 6, 34, 64), (4, 1024, 2, 34, 64), (4, 1024, 2, 34, 64)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("registration", ["custom_op", "triton_op"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_materialize_training_shapes_match_truth(dtype, registration, compiled):
    options = materialize_mod.MaterializeLaunchOptions(registration=registration, poison_buffers=True)
    torch._dynamo.reset()
    seed = zlib.crc32(repr((str(dtype), registration, compiled)).encode())
    factors = [mat.make_factors(*shape, dtype, seed + i) for i, shape in enumerate(SMALL_QKV)]
    grads = [torch.randn(bsz, seq, heads, dim, generator=torch.Generator().manual_seed(seed + 7 + i)).to(dtype).cuda()
             for i, (bsz, seq, _, heads, dim) in enumerate(SMALL_QKV)]

    def op(pairs):
        return tpa_materialize_many(pairs, options=options)

    fn = torch.compile(op, fullgraph=True) if compiled else op
    leaves = [(a.detach().requires_grad_(True), b.detach().requires_grad_(True)) for a, b in factors]
    outs = fn(leaves)
    got_grads = torch.autograd.grad(outs, [t for pair in leaves for t in pair], grads)
    for i, ((a, b), grad) in enumerate(zip(factors, grads)):
        got = (outs[i], got_grads[2 * i], got_grads[2 * i + 1])
        same_dtype = mat.forward_backward(materialize_reference, a, b, grad)
        mat.assert_close_to_truth(got, same_dtype, mat.truth(a, b, grad))


def test_inductor_emits_the_materialize_kernel():
    """Compiled code launches the triton_op's kernel itself (no call of the op at run time)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    a = torch.randn(4, 64, 2, 34, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    _, codes = run_and_get_code(torch.compile(lambda x, y: tpa_materialize_many([(x, y)])[0] * 2), a, b)
    code = "\n".join(codes)
    assert "materialize_fwd_kernel" in code  # the kernel of tpa.ops.kernels.materialize
    assert "tpa.materialize" not in code
