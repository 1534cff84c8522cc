"""Fused Q/K/V materialisation (tpa.ops.fused_materialize) against float64 ground truth and the einsum twin.

On a machine without CUDA the kernels run under Triton's interpreter (tests/ops/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with CUDA they run compiled on the GPU.

Tolerance rule (FlashAttention's): the kernel's max error against float64 must be at most twice the
max error of the same computation done by PyTorch in the input dtype (the einsum twin and its
autograd), plus a small floor relative to the size of the result. Buffers the op allocates are
poisoned with NaN before the kernels write them.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import replace

import pytest
import torch

from tests.ops.kernels import DEVICE, rerun_with_interpreter, skip_unless_kernels
from tpa.ops import fused_materialize as materialize_mod
from tpa.ops.fused_materialize import MaterializeConfig, default_configs, tpa_materialize, tpa_materialize_many
from tpa.ops.naive import materialize as materialize_reference

needs_kernel = skip_unless_kernels("test_kernels_in_fresh_process")

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(materialize_mod, "DEFAULT_LAUNCH_OPTIONS",
                        replace(materialize_mod.DEFAULT_LAUNCH_OPTIONS, poison_buffers=True))


def make_factors(bsz, seq, rank, heads, dim, dtype, seed):
    """``a [B, T, R, H]`` and ``b [B, T, R, D]`` as strided views into one wider buffer (as the
    fused projection's split gives them), with spare time steps so the batch stride is not T * width."""
    g = torch.Generator().manual_seed(seed)
    width = rank * heads + rank * dim + 3
    buf = torch.randn(bsz, seq + 2, width, generator=g).to(dtype).to(DEVICE)
    a = buf[:, 1 : seq + 1, : rank * heads].unflatten(-1, (rank, heads))
    b = buf[:, 1 : seq + 1, rank * heads + 3 :].unflatten(-1, (rank, dim))
    return a, b


def truth(a, b, grad, scale=None):
    """Output and factor gradients in float64 (plain formulas, no autograd)."""
    a, b, grad = (t.detach().cpu().double() for t in (a, b, grad))
    s = 1.0 / a.shape[2] if scale is None else scale
    out = torch.einsum("btrh,btrd->bthd", a, b) * s
    grad_a = torch.einsum("bthd,btrd->btrh", grad, b) * s
    grad_b = torch.einsum("bthd,btrh->btrd", grad, a) * s
    return out, grad_a, grad_b


def forward_backward(fn, a, b, grad):
    """``fn(a, b)`` and the gradients of ``(fn(a, b) * grad).sum()``; a and b keep their strides."""
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    out = fn(a, b)
    ga, gb = torch.autograd.grad(out, (a, b), grad)
    return out, ga, gb


def max_err(x, ref):
    return (x.detach().cpu().double() - ref).abs().max().item()


def assert_close_to_truth(got, same_dtype, exact, names=("out", "grad_a", "grad_b")):
    dt = got[0].dtype
    for name, x, pt, ref in zip(names, got, same_dtype, exact):
        assert x.dtype == dt and x.shape == ref.shape, f"{name}: {x.dtype} {tuple(x.shape)}"
        assert not torch.isnan(x).any(), f"{name}: elements left unwritten (NaN poison survived)"
        err, err_pt = max_err(x, ref), max_err(pt, ref)
        bound = 2 * err_pt + FLOOR[dt] * ref.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > 2 x PyTorch-{dt} error {err_pt:.3g} + floor"


# ----------------------------------------------------------------------------------------------
# Kernel against the truth
# ----------------------------------------------------------------------------------------------

# (B, T, R, H, D, configs): odd T, ranks 1, 2, 3 and 6, head counts 34 and 78 (not powers of two),
# feature sizes 64 and 80. Configs: the heuristic (None: tensor-core products with one head block for
# 16-bit inputs, multiply-adds for float32), or forced ones: head-block loops (block_h < H) with and
# without tensor cores, token blocks that do not divide B * T. "dot" applies to 16-bit inputs only.
FMA_BLOCKS = (MaterializeConfig(4, 8, 4), MaterializeConfig(4, 16, 4))
DOT_BLOCKS = (MaterializeConfig(2, 16, 4, dot=True), MaterializeConfig(4, 32, 4, dot=True))
CASES = [
    (2, 7, 1, 34, 64, None),
    (1, 13, 2, 78, 80, DOT_BLOCKS),
    (2, 7, 3, 34, 80, FMA_BLOCKS),
    (1, 13, 6, 78, 64, FMA_BLOCKS),
    (2, 7, 6, 34, 64, None),
    (2, 5, 6, 78, 80, DOT_BLOCKS),
]


def _case_id(case):
    bsz, seq, rank, heads, dim, cfg = case
    tag = "default" if cfg is None else ("dot" if cfg[0].dot else "fma") + "-blocks"
    return f"B{bsz}-T{seq}-R{rank}-H{heads}-D{dim}-{tag}"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_kernel_matches_truth(case, dtype, poison):
    bsz, seq, rank, heads, dim, cfg = case
    seed = zlib.crc32(repr((case[:5], str(dtype))).encode())
    a, b = make_factors(bsz, seq, rank, heads, dim, dtype, seed)
    assert not a.is_contiguous() and not b.is_contiguous()
    grad = torch.randn(bsz, seq, heads, dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    if cfg is not None and cfg[0].dot and dtype == torch.float32:
        cfg = None
    configs = {} if cfg is None else {"fwd_config": cfg[0], "bwd_config": cfg[1]}
    got = forward_backward(functools.partial(tpa_materialize, backend="triton", **configs), a, b, grad)
    assert got[0].is_contiguous()
    same_dtype = forward_backward(materialize_reference, a, b, grad)
    assert_close_to_truth(got, same_dtype, truth(a, b, grad))


# Groups of pairs for one launch (tpa_materialize_many): Q, K, V with ranks (6, 2, 2); a prefill
# with a cache (keys longer than queries); a value feature size that differs; 34 and 78 heads.
GROUPS = [
    [(2, 7, 6, 34, 64), (2, 7, 2, 34, 64), (2, 7, 2, 34, 64)],
    [(1, 5, 3, 78, 64), (1, 13, 1, 78, 64), (1, 13, 2, 78, 80)],
    [(3, 3, 2, 34, 80), (3, 3, 1, 34, 80)],
]


@pytest.fixture(params=["custom_op", "triton_op"])
def registration(request, monkeypatch):
    """Both registrations of the op: ``custom_op`` and ``triton_op`` (eager here; compiled by inductor
    on a GPU, which scripts/gpu_model_check.py covers)."""
    monkeypatch.setattr(materialize_mod, "DEFAULT_LAUNCH_OPTIONS",
                        replace(materialize_mod.DEFAULT_LAUNCH_OPTIONS, registration=request.param))
    return request.param


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("group", GROUPS, ids=["qkv-622", "prefill-cache-dv80", "two-parts"])
def test_grouped_kernel_matches_truth(group, dtype, poison, registration):
    """Each pair of a one-launch group equals its own float64 truth (outputs and both gradients)."""
    seed = zlib.crc32(repr((group, str(dtype))).encode())
    factors = [make_factors(*shape, dtype, seed + i) for i, shape in enumerate(group)]
    grads = [torch.randn(bsz, seq, heads, dim, generator=torch.Generator().manual_seed(seed + 7 + i)).to(dtype).to(DEVICE)
             for i, (bsz, seq, _, heads, dim) in enumerate(group)]
    leaves = [(a.detach().requires_grad_(True), b.detach().requires_grad_(True)) for a, b in factors]
    outs = tpa_materialize_many(leaves, backend="triton")
    assert len(outs) == len(group)
    flat_leaves = [t for pair in leaves for t in pair]
    got_grads = torch.autograd.grad(outs, flat_leaves, grads)
    for i, ((a, b), grad) in enumerate(zip(factors, grads)):
        got = (outs[i], got_grads[2 * i], got_grads[2 * i + 1])
        same_dtype = forward_backward(materialize_reference, a, b, grad)
        assert_close_to_truth(got, same_dtype, truth(a, b, grad))


@needs_kernel
def test_grouped_unused_output_and_empty_part(poison):
    """An output that takes no part in the loss gets zero factor gradients; a pair with no tokens
    next to others is fine; scales per pair."""
    (a0, b0), (a1, b1) = make_factors(2, 5, 2, 34, 64, torch.float32, 1), make_factors(2, 5, 3, 34, 64, torch.float32, 2)
    a0, b0, a1, b1 = (t.detach().requires_grad_(True) for t in (a0, b0, a1, b1))
    empty = (torch.zeros(0, 5, 2, 34, device=DEVICE, requires_grad=True),
             torch.zeros(0, 5, 2, 64, device=DEVICE, requires_grad=True))
    o0, o1, o2 = tpa_materialize_many([(a0, b0), (a1, b1), empty], scales=[0.3, None, None], backend="triton")
    assert o2.shape == (0, 5, 34, 64)
    torch.testing.assert_close(o0, materialize_reference(a0, b0, scale=0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1, materialize_reference(a1, b1), rtol=1e-5, atol=1e-5)
    o0.sum().backward()
    assert torch.equal(a1.grad, torch.zeros_like(a1)) and torch.equal(b1.grad, torch.zeros_like(b1))
    torch.testing.assert_close(b0.grad, 0.3 * a0.sum(-1, keepdim=True).expand_as(b0), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_grouped_more_than_three_pairs():
    """Four pairs: two launches (three pairs, then one), each pair equal to the twin."""
    pairs = [make_factors(1, 3, r, 5, 16, torch.float32, seed=r) for r in (1, 2, 3, 2)]
    for (a, b), out in zip(pairs, tpa_materialize_many(pairs, backend="triton")):
        torch.testing.assert_close(out, materialize_reference(a, b), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_layouts_scale_and_strides(poison):
    """A head factor with non-unit last stride (copied by the launcher), an expanded (stride-0)
    learned factor as the layer passes it, a non-contiguous output gradient, a custom scale."""
    bsz, seq, rank, heads, dim = 2, 5, 2, 34, 80
    _, b = make_factors(bsz, seq, rank, heads, dim, torch.bfloat16, seed=11)
    a_t = torch.randn(bsz, seq, heads, rank, dtype=torch.bfloat16, device=DEVICE).transpose(2, 3)
    a_param = torch.randn(rank, heads, dtype=torch.bfloat16, device=DEVICE).expand(bsz, seq, rank, heads)
    grad = torch.randn(bsz, heads, seq, dim, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    assert a_t.stride(-1) != 1 and a_param.stride(0) == 0 and not grad.is_contiguous()
    for a in (a_t, a_param):
        for scale in (None, 0.37):
            fn = functools.partial(tpa_materialize, scale=scale, backend="triton")
            ref_fn = functools.partial(materialize_reference, scale=scale)
            got, pt = forward_backward(fn, a, b, grad), forward_backward(ref_fn, a, b, grad)
            assert_close_to_truth(got, pt, truth(a, b, grad, scale))


@needs_kernel
def test_gradcheck_float64(registration):
    """The kernel in float64 (float64 accumulation) passes autograd's numerical gradient check."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1, 3, 2, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    b = torch.randn(1, 3, 2, 6, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    for bwd in (None, MaterializeConfig(2, 2, 4)):  # all heads at once; the backward's head-block loop
        fn = functools.partial(tpa_materialize, backend="triton", bwd_config=bwd)
        assert torch.autograd.gradcheck(fn, (a, b), fast_mode=True)
    torch.testing.assert_close(fn(a, b), materialize_reference(a, b), rtol=1e-12, atol=1e-12)


@needs_kernel
def test_custom_op_registration():
    """Schema, fake (meta) kernel, autograd registration and dynamic-shape tracing of the op."""
    a, b = make_factors(2, 3, 3, 7, 16, torch.float32, seed=2)
    a2, b2 = make_factors(1, 5, 1, 7, 24, torch.float32, seed=3)
    a, b, a2, b2 = (t.requires_grad_(True) for t in (a, b, a2, b2))
    fwd, bwd = default_configs(7, 24, torch.float32)
    config = fwd.as_list() + bwd.as_list()
    torch.library.opcheck(torch.ops.tpa.materialize.default, ([a], [b], [0.5], config))
    torch.library.opcheck(torch.ops.tpa.materialize.default, ([a, a2], [b, b2], [0.5, 1.0], config))


@needs_kernel
def test_compiled_fullgraph_matches_eager():
    """torch.compile(fullgraph=True): the op is one node (no graph break) with its backward, and the
    auto backend on CPU compiles the reference twin."""
    a, b = make_factors(2, 5, 2, 6, 16, torch.float32, seed=3)
    grad = torch.randn(2, 5, 6, 16, device=DEVICE)
    backends = ["triton"] if DEVICE == "cuda" else ["triton", "auto"]
    for backend in backends:
        fn = torch.compile(functools.partial(tpa_materialize, backend=backend), fullgraph=True)
        got = forward_backward(fn, a, b, grad)
        ref = forward_backward(materialize_reference, a, b, grad)
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_autocast_casts_like_einsum():
    """Under autocast float32 factors are cast to the autocast dtype, as einsum's are."""
    a, b = make_factors(1, 4, 2, 5, 16, torch.float32, seed=4)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = tpa_materialize(a, b, backend="triton")
        ref = materialize_reference(a, b)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_kernel
def test_empty_batch():
    a = torch.randn(0, 3, 2, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(0, 3, 2, 8, device=DEVICE, requires_grad=True)
    out = tpa_materialize(a, b, backend="triton")
    assert out.shape == (0, 3, 5, 8)
    out.sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


@needs_kernel
def test_layer_with_the_kernel_matches_reference(monkeypatch, registration):
    """TensorProductAttention's SDPA path with the fused op (forced) gives the reference's output and
    parameter gradients (the wiring: Q, K and V through the op, factors sliced from one projection)."""
    import tpa.layers.tpa as tpa_layer
    from tpa.layers import AttentionContext, TensorProductAttention
    from tpa.modules import RotaryEmbedding

    torch.manual_seed(0)
    layer = TensorProductAttention(48, 6, 16, q_rank=3, k_rank=2, v_rank=1).to(DEVICE)
    x = torch.randn(2, 7, 48, device=DEVICE)
    cos, sin = RotaryEmbedding(16)(torch.arange(7, device=DEVICE).expand(2, 7))
    ctx = AttentionContext(cos=cos, sin=sin)

    def run():
        layer.zero_grad()
        out = layer(x, ctx)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in layer.parameters()]

    calls = []

    def fused(pairs):
        calls.append([a.shape for a, _ in pairs])
        return tpa_materialize_many(pairs, backend="triton")

    monkeypatch.setattr(tpa_layer, "tpa_materialize_many", functools.partial(tpa_materialize_many, backend="reference"))
    ref_out, ref_grads = run()
    monkeypatch.setattr(tpa_layer, "tpa_materialize_many", fused)
    out, grads = run()
    assert calls == [[(2, 7, 3, 6), (2, 7, 2, 6), (2, 7, 1, 6)]]  # Q, K and V in one call
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


def test_kernels_in_fresh_process():
    """When triton was imported (by another test module) before TRITON_INTERPRET=1 could be set,
    the kernel tests above are skipped here and run in a fresh interpreter process instead."""
    rerun_with_interpreter(__file__, "not fresh_process")


# ----------------------------------------------------------------------------------------------
# Dispatch, launch parameters, errors (no kernel needed)
# ----------------------------------------------------------------------------------------------


def test_auto_and_reference_backends_on_cpu_are_the_twin():
    a, b = make_factors(2, 5, 3, 7, 16, torch.float32, seed=6)
    a, b = a.cpu(), b.cpu()
    ref = materialize_reference(a, b)
    assert torch.equal(tpa_materialize(a, b), ref)
    assert torch.equal(tpa_materialize(a, b, backend="reference"), ref)
    assert torch.equal(tpa_materialize(a, b, scale=0.25), materialize_reference(a, b, scale=0.25))


def test_default_configs():
    """Powers of two; tensor-core products for 16-bit inputs only; one head block while the
    per-token tile fits, else head blocks that pad H least; tiles of bounded size."""
    k = materialize_mod.MaterializeHeuristic()
    fwd, bwd = default_configs(34, 64, torch.bfloat16)
    assert fwd.dot and bwd.dot and fwd.block_h == bwd.block_h == 64  # one block: 64 x 64 <= single_max
    assert fwd.block_t == k.tile // (64 * 64)
    fwd, _ = default_configs(78, 256, torch.float16)
    assert fwd.block_h == 128 and fwd.block_t == 1  # 128 x 256 <= single_max
    fwd, _ = default_configs(300, 256, torch.float16)
    assert fwd.block_h == 16  # 512 x 256 > single_max: blocks of 16 pad 300 least (304 rows)
    fwd, bwd = default_configs(34, 64, torch.float32)
    assert not fwd.dot and not bwd.dot and fwd.block_h == 8  # 5 blocks of 8 = 40 rows
    for dtype in (torch.bfloat16, torch.float32):
        for heads in (1, 5, 34, 47, 61, 78, 128, 300):
            for dim in (32, 64, 80, 128, 256):
                for cfg in default_configs(heads, dim, dtype):
                    block_d = materialize_mod._block_d(dim, cfg.dot)
                    tile = k.tile if cfg.dot else k.fma_tile
                    assert cfg.block_t * cfg.block_h * block_d <= max(tile, cfg.block_h * block_d)
                    assert cfg.block_h <= max(16 if cfg.dot else 1, 1 << (heads - 1).bit_length())
                    assert cfg.dot == (dtype == torch.bfloat16)


def _bad(mutate):
    a = torch.randn(2, 3, 2, 5)
    b = torch.randn(2, 3, 2, 8)
    return mutate(a, b)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a, b: (a[0], b), ValueError, "4 dimensions"),
        (lambda a, b: (a, b[..., None]), ValueError, "4 dimensions"),
        (lambda a, b: (a, b[:1]), ValueError, "agree in B, T and R"),
        (lambda a, b: (a, b[:, :2]), ValueError, "agree in B, T and R"),
        (lambda a, b: (a, b[:, :, :1]), ValueError, "agree in B, T and R"),
        (lambda a, b: (a[:, :, :0], b[:, :, :0]), ValueError, "rank R must be >= 1"),
        (lambda a, b: (a, b.double()), TypeError, "share one dtype"),
        (lambda a, b: (a.long(), b.long()), TypeError, "float16, bfloat16"),
        (lambda a, b: (a.numpy(), b), TypeError, "must be a torch.Tensor"),
        (lambda a, b: (a, b.to("meta")), ValueError, "share a device"),
    ],
    ids=["a-3d", "b-5d", "batch", "time", "rank", "rank-0", "dtypes", "int", "numpy", "device"],
)
def test_bad_input_raises(mutate, exc, match):
    a, b = _bad(mutate)
    with pytest.raises(exc, match=match):
        tpa_materialize(a, b)


def test_grouped_bad_input_raises():
    a, b = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 8)
    with pytest.raises(ValueError, match="at least one"):
        tpa_materialize_many([])
    with pytest.raises(ValueError, match="2 scales for 1 pairs"):
        tpa_materialize_many([(a, b)], scales=[None, None])
    with pytest.raises(TypeError, match="pair 1 must be an"):
        tpa_materialize_many([(a, b), a])
    with pytest.raises(ValueError, match="b \\(pair 1\\).*agree in B, T and R"):
        tpa_materialize_many([(a, b), (a, b[:, :, :1])])
    with pytest.raises(ValueError, match="pairs share dtype, device and H"):
        tpa_materialize_many([(a, b), (torch.randn(2, 3, 2, 6), b)])
    with pytest.raises(ValueError, match="pairs share dtype, device and H"):
        tpa_materialize_many([(a, b), (a.double(), b.double())])


def test_grouped_reference_equals_single_calls():
    pairs = [make_factors(2, 5, r, 7, 16, torch.float32, seed=r) for r in (1, 2, 3, 4)]
    pairs = [(a.cpu(), b.cpu()) for a, b in pairs]
    outs = tpa_materialize_many(pairs, scales=[None, 0.5, None, 2.0])
    for (a, b), s, o in zip(pairs, [None, 0.5, None, 2.0], outs):
        assert torch.equal(o, materialize_reference(a, b, scale=s))


def test_bad_arguments_raise():
    a, b = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match="backend must be"):
        tpa_materialize(a, b, backend="cuda")
    with pytest.raises(ValueError, match="power of two"):
        MaterializeConfig(3, 8, 4)
    with pytest.raises(ValueError, match="power of two"):
        MaterializeConfig(4, 8, 0)
    with pytest.raises(ValueError, match="block_h >= 16"):
        MaterializeConfig(4, 8, 4, dot=True)
