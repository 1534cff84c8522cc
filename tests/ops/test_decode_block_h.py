"""Forced head blocks and padded head-factor rows of the FlashTPA decode kernel (tpa.ops.decode).

Head counts that are not powers of two (34: the ``small`` preset's; 78) leave part of the last head
block masked; ``DecodeConfig(block_h=...)`` trades that padding for more programs, and
``DecodeLaunchOptions(a_head_pad=M)`` lets the A-cache loads read padded rows. Every variant is
checked against the float64 truth by the rule of tests/ops/test_decode.py (twice PyTorch's error at
the dtype), on ragged odd lengths, one and several queries, contiguous and paged caches.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.ops.kernels import rerun_with_interpreter, skip_unless_kernels
from tests.ops.test_decode import POISON, assert_close_to_truth, make_inputs
from tpa.ops import decode_launch, tpa_decode
from tpa.ops.decode import DecodeConfig, DecodeHeuristic, DecodeLaunchOptions, default_config

needs_kernel = skip_unless_kernels("test_block_h_in_fresh_process")

pytestmark = pytest.mark.usefixtures("fresh_decode_plans")


# (lengths, N, H, (R_q, R_k, R_v), dtype, paged): H not a power of two, ranks 1 to 3, lengths odd
# and ragged (no multiple of the block or page size), N > 1 for speculative decoding.
SHAPES = [
    ([1, 37, 69], 1, 34, (1, 1, 1), torch.bfloat16, False),
    ([5, 69, 23], 3, 78, (3, 2, 3), torch.float16, True),
    ([41, 2], 2, 34, (2, 3, 2), torch.float32, True),
    ([13, 67], 1, 78, (2, 1, 1), torch.bfloat16, False),
]


def _inputs(lengths, n, h, ranks, dtype, paged, seed_tag):
    seed = zlib.crc32(repr((lengths, n, h, ranks, str(dtype), paged, seed_tag)).encode())
    return make_inputs(lengths, n, h, 64, 64, ranks, dtype, paged=paged, capacity=71, seed=seed)


@needs_kernel
@pytest.mark.parametrize("block_h", [16, 32, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[2]}-N{s[1]}-R{''.join(map(str, s[3]))}-"
                                                      f"{str(s[4])[6:]}-{'paged' if s[5] else 'contiguous'}")
def test_every_block_h_matches_truth(shape, block_h):
    """Each head block size, with as many head blocks as it takes (the last one partly masked) and
    two splits (so the merge kernel runs too), gives the truth."""
    inputs = _inputs(*shape, seed_tag=block_h)
    lengths, n, h = shape[0], shape[1], shape[2]
    cfg = DecodeConfig(block_h=block_h, num_splits=2)
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg, options=POISON)
    assert out.shape == (len(lengths), n, h, 64)
    assert_close_to_truth(out, lse, inputs)


@needs_kernel
def test_heads_inner_grid_order_gives_the_same_result():
    """The grid with the head/query tiles of a split side by side runs the same programs: bit for bit."""
    shape = SHAPES[1]  # H = 78 in five head blocks of 16, three queries in one query block, paged
    inputs = _inputs(*shape, seed_tag="inner")
    cfg = DecodeConfig(block_h=16, num_splits=3)
    want = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg, options=POISON)
    inner = DecodeLaunchOptions(poison_buffers=True, heads_inner=True)
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg, options=inner)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    grids = {entry.plan.split_grid for entry in decode_launch.PLANS.values() if entry.plan is not None}
    tiles = 5  # ceil(78 / 16) head blocks in one query block (block_n 4 >= N = 3)
    assert {(3, tiles, len(shape[0])), (tiles, 3, len(shape[0]))} <= grids
    assert_close_to_truth(out, lse, inputs)


def _padded(t: torch.Tensor, heads: int, fill: float) -> torch.Tensor:
    """``t`` as the view ``buf[..., :H]`` of a buffer of ``heads`` heads per row, the rest ``fill``."""
    buf = torch.full((*t.shape[:-1], heads), fill, dtype=t.dtype, device=t.device)
    buf[..., : t.shape[-1]] = t
    return buf[..., : t.shape[-1]]


@needs_kernel
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over a padded head's row
@pytest.mark.parametrize(("pad", "block_h"), [(8, 64), (16, 64), (16, 32)])
def test_padded_a_rows_give_the_same_result(pad, block_h):
    """A caches as strided views of wider buffers whose padding holds NaN: with the layout alone
    (a_head_pad=1) and with loads reading the padded rows (a_head_pad=pad), the result is the one of
    contiguous caches, bit for bit (the padded heads' rows are discarded), and the truth."""
    lengths, n, h, ranks, dtype, paged = [9, 61], 2, 34, (2, 2, 3), torch.bfloat16, pad == 16
    inputs = _inputs(lengths, n, h, ranks, dtype, paged, seed_tag=pad)
    heads = -(-h // pad) * pad
    padded = list(inputs)
    padded[2], padded[4] = _padded(inputs[2], heads, float("nan")), _padded(inputs[4], heads, float("nan"))
    assert padded[2].stride(2) == heads and torch.equal(padded[2], inputs[2])
    cfg = DecodeConfig(block_h=block_h, num_splits=3)
    want, want_lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg, options=POISON)
    assert_close_to_truth(want, want_lse, inputs)
    for options in (POISON, DecodeLaunchOptions(poison_buffers=True, a_head_pad=pad)):
        out, lse = tpa_decode(*padded, return_lse=True, backend="triton", config=cfg, options=options)
        assert torch.equal(out, want) and torch.equal(lse, want_lse), f"a_head_pad={options.a_head_pad}"
    plans = [entry.plan for entry in decode_launch.PLANS.values() if entry.plan is not None]
    assert {p.split_constexprs["A_HEADS"] for p in plans if p.split_constexprs["BLOCK_H"] == block_h} >= {h, heads}


@needs_kernel
def test_padded_a_rows_through_the_triton_op():
    """``torch.ops.tpa.decode`` (what torch.compile traces) carries a_head_pad, heads_inner and the
    least-padding head blocks (three of 16 at H = 34) and gives the eager numbers."""
    inputs = list(_inputs([7, 30], 1, 34, (1, 2, 1), torch.float32, False, seed_tag="op"))
    inputs[2], inputs[4] = _padded(inputs[2], 48, float("nan")), _padded(inputs[4], 48, float("nan"))
    options = DecodeLaunchOptions(a_head_pad=16, heads_inner=True,
                                  heuristic=DecodeHeuristic(head_blocks="least_padding"))
    cfg = DecodeConfig(num_splits=2)
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=cfg, options=options)
    (entry,) = decode_launch.PLANS.values()
    assert entry.plan.split_constexprs["BLOCK_H"] == 16 and entry.plan.split_grid == (3, 2, 2)
    config = decode_launch.config_to_list(cfg, options)
    op_out, op_lse = torch.ops.tpa.decode(*inputs[:7], None, 64 ** -0.5, True, config)
    torch.testing.assert_close(op_out, out, rtol=0, atol=0)
    torch.testing.assert_close(op_lse, lse, rtol=0, atol=0)
    assert_close_to_truth(out, lse, inputs)


def test_a_head_pad_needs_a_padded_layout():
    """Loads past H on caches that do not hold the padded rows are refused before any launch."""
    inputs = list(_inputs([5, 9], 1, 34, (2, 1, 1), torch.float32, False, seed_tag="bad"))
    with pytest.raises(ValueError, match="a_head_pad=16 reads 48 heads per row of a_k_cache"):
        tpa_decode(*inputs, backend="triton", options=DecodeLaunchOptions(a_head_pad=16))
    inputs[2] = _padded(inputs[2], 40, 0.0)  # room for 40 heads, not 48
    with pytest.raises(ValueError, match="a_head_pad=16 reads 48 heads"):
        tpa_decode(*inputs, backend="triton", options=DecodeLaunchOptions(a_head_pad=16))
    inputs[2] = _padded(inputs[2].contiguous(), 48, 0.0)
    with pytest.raises(ValueError, match="of a_v_cache"):
        tpa_decode(*inputs, backend="triton", options=DecodeLaunchOptions(a_head_pad=16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_h=24), "block_h must be a power of two, got 24"),
        (dict(block_h=0), "block_h must be a positive int"),
        (dict(block_h=True), "block_h must be a positive int"),
        (dict(block_h=16.0), "block_h must be a positive int"),
        (dict(block_m=8), "block_m must be >= 16"),
        (dict(block_n=3), "block_n must be a power of two"),
        (dict(num_warps=3), "num_warps must be a power of two"),
        (dict(num_warps=64), "num_warps must be at most 32"),
        (dict(num_splits=1025), "num_splits must be at most 1024"),
        (dict(num_stages=-1), "num_stages must be a positive int"),
    ],
)
def test_bad_launch_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


def test_least_padding_head_blocks_and_the_unchanged_default():
    least = DecodeHeuristic(head_blocks="least_padding")
    for h, pow2, fewest in ((34, 64, 16), (32, 32, 32), (78, 128, 16), (48, 64, 16), (64, 64, 64), (5, 16, 16)):
        assert default_config(16, 1, h, 64, 64, 1 << 19, 132).block_h == pow2, h
        assert default_config(16, 1, h, 64, 64, 1 << 19, 132, heuristic=least).block_h == fewest, h
    assert default_config(1, 4, 34, 64, 64, 4096, 132, heuristic=least).block_h == 16  # with 4 queries per tile
    with pytest.raises(ValueError, match="head_blocks must be 'pow2' or 'least_padding'"):
        DecodeHeuristic(head_blocks="fewest")


@needs_kernel
def test_least_padding_head_blocks_match_truth():
    inputs = _inputs([33, 70], 3, 78, (2, 2, 1), torch.bfloat16, True, seed_tag="least")
    options = DecodeLaunchOptions(poison_buffers=True, heuristic=DecodeHeuristic(head_blocks="least_padding"))
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", options=options)
    assert_close_to_truth(out, lse, inputs)


def test_bad_a_head_pad_is_refused():
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="a_head_pad must be an int >= 1"):
            DecodeLaunchOptions(a_head_pad=bad)


@needs_kernel
def test_head_block_too_small_for_a_dot_is_refused():
    """block_h = 8 makes 16-row tiles with two queries per program, but not with one."""
    inputs = _inputs([5, 9], 1, 34, (1, 1, 1), torch.float32, False, seed_tag="small")
    with pytest.raises(ValueError, match=r"block_h=8 gives tiles of 8 heads x 1 queries = 8 rows.*block_h >= 16"):
        tpa_decode(*inputs, backend="triton", config=DecodeConfig(block_h=8))


@needs_kernel
def test_head_block_of_8_with_two_queries_matches_truth():
    inputs = _inputs([5, 33], 2, 34, (2, 1, 2), torch.float32, True, seed_tag="bh8")
    out, lse = tpa_decode(*inputs, return_lse=True, backend="triton", config=DecodeConfig(block_h=8, block_n=2),
                          options=POISON)
    assert_close_to_truth(out, lse, inputs)


def test_block_h_in_fresh_process():
    """When triton was imported before TRITON_INTERPRET=1 could be set, the kernel tests above are
    skipped here and run in a fresh interpreter process instead."""
    rerun_with_interpreter(__file__, "truth or padded or too_small or inner")


def test_padded_loads_off_under_tracing():
    """Under torch.compile the op sees fake tensors, which hold the view alone (the room behind the last
    head is unknown): traced calls read H heads whatever the strides; a real tensor without the room
    behind its last head is still refused, and a real padded view gets the padded loads."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tpa.ops.decode_launch import _readable_heads

    shape, padded, unpadded = (2, 16, 2, 34), (1536, 96, 48, 1), (1088, 68, 34, 1)
    with FakeTensorMode():
        a = torch.empty_strided(shape, padded, dtype=torch.bfloat16)
        narrow = torch.empty_strided(shape, unpadded, dtype=torch.bfloat16)
        assert _readable_heads(34, 16, a, a) == 34
        assert _readable_heads(34, 16, narrow, a) == 34
    buf = torch.zeros(2, 16, 2, 48, dtype=torch.bfloat16)
    assert _readable_heads(34, 16, buf[..., :34], buf[..., :34]) == 48
    real = torch.empty_strided(shape, padded, dtype=torch.bfloat16)  # storage ends at the view's last head
    with pytest.raises(ValueError, match="1 elements of storage from its last head on"):
        _readable_heads(34, 16, real, real)
