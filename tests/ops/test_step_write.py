"""The one-launch RoPE and cache write of a static decode step (tpa.ops.step_write) against its twin.

The Triton kernel (on the GPU, or Triton's interpreter on the CPU) and the torch-op twin run on the
same fresh random inputs; the query part and the whole of every cache buffer (written slots,
untouched slots, the padding of a padded head-factor buffer) are compared. Both rotate in float32
and round once to the dtype, so they agree to one rounding of the dtype (fused multiply-adds on the
GPU may move a float32 product by an ulp before that rounding). Shapes are awkward on purpose: 34 and
78 heads, ranks 1 to 3, partial RoPE, ragged slots, a head-factor buffer padded to 48 heads.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.ops.kernels import DEVICE, rerun_with_interpreter, skip_unless_kernels
from tpa.ops.step_write import Segment, step_write, step_write_reference

needs_kernel = skip_unless_kernels("test_step_write_in_fresh_process")

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _tpa_layout(heads: int, ranks: tuple[int, int, int], dim: int, value_dim: int):
    """Segments of a TPA projection row (a_q, b_q, a_k, b_k, a_v, b_v) and the cache shapes."""
    r_q, r_k, r_v = ranks
    shapes = [("a_q", r_q, heads), ("b_q", r_q, dim), ("a_k", r_k, heads), ("b_k", r_k, dim),
              ("a_v", r_v, heads), ("b_v", r_v, value_dim)]
    segments, offset = {}, 0
    for name, rows, width in shapes:
        segments[name] = Segment(offset, rows, width, rotate=name in ("b_q", "b_k"))
        offset += rows * width
    return segments, offset


def _caches(bsz, capacity, segments, names, dtype, pad_heads):
    """Cache buffers of random values, the same for a name at every call; a padded head-factor buffer's padding 0."""
    caches = {}
    for name in names:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        seg = segments[name]
        stored = pad_heads if name.startswith("a_") and pad_heads else seg.width
        buf = torch.randn(bsz, capacity, seg.rows, stored, generator=gen).to(dtype)
        if stored > seg.width:
            buf[..., seg.width:] = 0
        caches[name] = buf.to(DEVICE)
    return caches


def _views(caches, segments):
    return {name: buf[..., : segments[name].width] for name, buf in caches.items()}


CASES = [  # heads, ranks, D, E, rope features, batch, dtype, padded A buffer (heads)
    (34, (6, 2, 2), 64, 64, 64, 3, torch.bfloat16, 48),
    (78, (3, 1, 3), 64, 32, 32, 2, torch.float16, 0),
    (34, (1, 3, 1), 10, 6, 4, 5, torch.float32, 0),
    (7, (2, 2, 1), 64, 64, 64, 1, torch.float32, 16),
]


@needs_kernel
@pytest.mark.parametrize("heads, ranks, dim, value_dim, rope, bsz, dtype, pad", CASES)
def test_tpa_step_matches_twin(heads, ranks, dim, value_dim, rope, bsz, dtype, pad):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((heads, ranks, dim, rope, bsz, str(dtype))).encode()))
    segments, width = _tpa_layout(heads, ranks, dim, value_dim)
    capacity = 13
    projected = torch.randn(bsz, width + 5, generator=gen).to(dtype).to(DEVICE)[:, 3: 3 + width]  # row stride > P
    angles = torch.rand(bsz, rope // 2, generator=gen, dtype=torch.float64) * 1e4
    cos, sin = angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)
    slots = torch.randperm(capacity, generator=gen)[:bsz].to(DEVICE)
    names = ("a_k", "b_k", "a_v", "b_v")
    results = {}
    for backend in ("triton", "reference"):
        caches = _caches(bsz, capacity, segments, names, dtype, pad)
        views = _views(caches, segments)
        q = step_write(projected, cos, sin, slots, segments["b_q"], [(segments[n], views[n]) for n in names],
                       backend=backend)
        results[backend] = (q, caches)
    (q_k, caches_k), (q_r, caches_r) = results["triton"], results["reference"]
    assert q_k.shape == (bsz, ranks[0], dim) and q_k.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(q_k, q_r, rtol=tol, atol=tol)
    for name in names:
        torch.testing.assert_close(caches_k[name], caches_r[name], rtol=tol, atol=tol)
        fresh = _caches(bsz, capacity, segments, [name], dtype, pad)[name]
        written = torch.zeros(bsz, capacity, dtype=torch.bool)
        written[torch.arange(bsz), slots.cpu()] = True
        assert torch.equal(caches_k[name][~written.to(DEVICE)], fresh[~written.to(DEVICE)]), "other slots changed"
        if pad and name.startswith("a_"):
            assert not caches_k[name][..., segments[name].width:].any(), "the padding was written"
    # the query is the b_q part rotated: its unrotated features are copies
    if rope < dim:
        assert torch.equal(q_k[..., rope:], projected[:, segments["b_q"].offset:][:, : ranks[0] * dim]
                           .reshape(bsz, ranks[0], dim)[..., rope:])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_heads_step_matches_twin(dtype):
    """The MHA/GQA layout: q [H, D] and k [G, D] rotated, v [G, D] copied."""
    gen = torch.Generator().manual_seed(7)
    h, g, d, bsz, capacity = 22, 2, 64, 3, 9
    segments = {"q": Segment(0, h, d, True), "k": Segment(h * d, g, d, True), "v": Segment((h + g) * d, g, d, False)}
    projected = torch.randn(bsz, (h + 2 * g) * d, generator=gen).to(dtype).to(DEVICE)
    angles = torch.rand(bsz, d // 2, generator=gen, dtype=torch.float64) * 3e4
    cos, sin = angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)
    slots = torch.tensor([0, 8, 3], device=DEVICE)
    out = {}
    for backend in ("triton", "reference"):
        caches = _caches(bsz, capacity, segments, ("k", "v"), dtype, 0)
        q = step_write(projected, cos, sin, slots, segments["q"], [(segments[n], caches[n]) for n in ("k", "v")],
                       backend=backend)
        out[backend] = (q, caches)
    tol = TOL[dtype]
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=tol, atol=tol)
    for name in ("k", "v"):
        torch.testing.assert_close(out["triton"][1][name], out["reference"][1][name], rtol=tol, atol=tol)
    assert torch.equal(out["triton"][1]["v"][torch.arange(bsz), slots.cpu()], projected[:, (h + g) * d:].reshape(bsz, g, d))


def test_twin_is_the_layers_rotation():
    """The twin rotates as the layers do (tpa.layers.base.apply_partial_rotary over [B, 1, R, D])."""
    from tpa.layers.base import apply_partial_rotary

    gen = torch.Generator().manual_seed(3)
    bsz, rows, dim, rope = 2, 3, 16, 8
    projected = torch.randn(bsz, rows * dim, generator=gen, dtype=torch.bfloat16)
    angles = torch.rand(bsz, rope // 2, generator=gen, dtype=torch.float64) * 100
    cos, sin = angles.cos().float(), angles.sin().float()
    cache = torch.zeros(bsz, 4, rows, dim, dtype=torch.bfloat16)
    q = step_write_reference(projected, cos, sin, torch.tensor([1, 2]), Segment(0, rows, dim, True),
                             [(Segment(0, rows, dim, True), cache)])
    expected = apply_partial_rotary(projected.reshape(bsz, 1, rows, dim), cos[:, None], sin[:, None])[:, 0]
    assert torch.equal(q, expected)
    assert torch.equal(cache[0, 1], expected[0]) and torch.equal(cache[1, 2], expected[1])
    assert not cache[0, 0].any() and not cache[1, 1].any()


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(projected=a["projected"][:, None]), "projected must be"),
    (lambda a: a.update(cos=a["cos"].double()), "cos and sin must be float32"),
    (lambda a: a.update(slots=a["slots"].int()), "slots must be int64"),
    (lambda a: a.update(query=Segment(10, 2, 8, True)), "lies outside"),
    (lambda a: a.update(query=Segment(0, 2, 4, True)), "RoPE turns 8 features"),
    (lambda a: a.update(writes=[(Segment(0, 2, 8, False), torch.zeros(2, 4, 2, 9))]), "must be \\[B=2, capacity, 2, 8\\]"),
    (lambda a: a.update(writes=[(Segment(0, 2, 8, False), torch.zeros(2, 4, 2, 8, dtype=torch.float16))]),
     "a cache must be torch.float32"),
    (lambda a: a.update(writes=[]), "1 to 4 cache writes"),
])
def test_bad_inputs_say_what_was_expected(change, message):
    args = dict(projected=torch.zeros(2, 16), cos=torch.ones(2, 4), sin=torch.zeros(2, 4),
                slots=torch.tensor([0, 1]), query=Segment(0, 2, 8, True),
                writes=[(Segment(0, 2, 8, False), torch.zeros(2, 4, 2, 8))])
    change(args)
    with pytest.raises(ValueError, match=message):
        step_write(args["projected"], args["cos"], args["sin"], args["slots"], args["query"], args["writes"],
                   backend="reference")


@pytest.mark.gpu
def test_compiled_kernel_matches_twin_on_gpu():
    """``pytest -m gpu``: every case above with the kernel compiled (fused multiply-adds included)."""
    for case in CASES:
        test_tpa_step_matches_twin(*case)
    for dtype in (torch.bfloat16, torch.float32):
        test_grouped_heads_step_matches_twin(dtype)


def test_step_write_in_fresh_process():
    rerun_with_interpreter(__file__, "matches_twin")
