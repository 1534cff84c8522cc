"""The launch variants of ``tpa bench decode`` (--block-h, --num-warps, --pad-a-heads, --pad-loads):
the combinations a command line asks for, what each launches, and the padded A layout of its inputs."""

import pytest
import torch

import tpa.cli
from tpa.bench.decode.inputs import tpa_inputs
from tpa.bench.decode.variants import Variant, applies, check_args, padded_heads, variants_from_args
from tpa.ops.decode import DecodeConfig, DecodeLaunchOptions


def _args(*argv):
    return tpa.cli.build_parser().parse_args(["bench", "decode", *argv])


def test_default_command_line_times_the_default_variant_only():
    args = _args()
    assert variants_from_args(args) == [Variant()]
    assert Variant().is_default and Variant().label == "default"
    assert Variant().config(DecodeConfig) is None
    launch = DecodeLaunchOptions()
    assert Variant().options(launch) is launch


def test_grid_lengths_are_every_power_of_two_or_the_given_ones():
    """Without --lengths the grid runs every power of two from --min-len to --max-len (the default is
    the Figure 5 grid, 4K to 512K); --lengths gives them in its order."""
    from tpa.bench.decode.grid import grid_lengths

    assert grid_lengths(_args()) == [4096 << i for i in range(8)]
    assert grid_lengths(_args("--min-len", "4096", "--max-len", "32768")) == [4096, 8192, 16384, 32768]
    assert grid_lengths(_args("--lengths", "524288", "32768")) == [524288, 32768]


def test_variants_are_the_product_of_the_lists():
    args = _args("--block-h", "16", "32", "64", "--pad-a-heads", "1", "8", "16", "--pad-loads", "both",
                 "--grid-only", "--lengths", "524288", "32768")
    assert args.grid_only and args.lengths == [524288, 32768]
    variants = variants_from_args(args)
    assert len(variants) == 3 * (1 + 2 * 2)
    assert [v.label for v in variants[:5]] == ["bh16", "bh16-pad8", "bh16-pad8-maskH", "bh16-pad16", "bh16-pad16-maskH"]
    v = variants[3]
    assert v.config(DecodeConfig) == DecodeConfig(block_h=16)
    assert v.options(DecodeLaunchOptions()).a_head_pad == 16 and v.load_heads(34) == 48
    assert variants[4].options(DecodeLaunchOptions()).a_head_pad == 1 and variants[4].load_heads(34) == 34
    warps = variants_from_args(_args("--num-warps", "0", "4"))
    assert [v.label for v in warps] == ["default", "w4"] and warps[1].config(DecodeConfig) == DecodeConfig(num_warps=4)


def test_grid_order_variants_only_with_several_head_blocks():
    variants = variants_from_args(_args("--block-h", "16", "64", "--head-order", "both"))
    assert [v.label for v in variants] == ["bh16", "bh16-heads", "bh64", "bh64-heads"]
    assert variants[1].options(DecodeLaunchOptions()) == DecodeLaunchOptions(heads_inner=True)
    assert [applies(v, 34) for v in variants] == [True, True, True, False]
    assert not applies(Variant(heads_inner=True), 34)  # the heuristic's block holds all 34 heads


def test_a_pad_that_adds_no_head_is_skipped():
    assert padded_heads(34, 16) == 48 and padded_heads(34, 8) == 40 and padded_heads(32, 16) == 32
    assert applies(Variant(a_pad=16, padded_loads=True), 34)
    assert not applies(Variant(a_pad=16, padded_loads=True), 32)
    assert applies(Variant(block_h=16), 32)


@pytest.mark.parametrize("argv", [["--block-h", "24"], ["--num-warps", "-2"], ["--pad-a-heads", "0"]])
def test_bad_variant_values_stop_the_run(argv):
    with pytest.raises(SystemExit, match="tpa bench decode: --"):
        check_args(_args(*argv))


def test_padded_inputs_are_views_of_wider_buffers():
    torch.manual_seed(0)
    a_q, b_q, a_k, b_k, a_v, b_v, lens, table = tpa_inputs(torch, 2, 5, 34, 8, (2, 3, 2), torch.float32, a_heads=48,
                                                           device="cpu")
    assert a_k.shape == (2, 5, 3, 34) and a_v.shape == (2, 5, 2, 34)
    assert a_k.stride() == (5 * 3 * 48, 3 * 48, 48, 1) and a_v.stride(2) == 48
    assert b_k.is_contiguous() and a_q.shape == (2, 1, 2, 34) and table is None and lens.tolist() == [5, 5]
    plain = tpa_inputs(torch, 2, 5, 34, 8, (2, 3, 2), torch.float32, device="cpu")
    assert plain[2].is_contiguous()
    with pytest.raises(ValueError, match="a_heads=30 must be at least h=34"):
        tpa_inputs(torch, 1, 5, 34, 8, (1, 1, 1), torch.float32, a_heads=30, device="cpu")


@pytest.mark.gpu
def test_bench_decode_writes_one_row_per_variant(tmp_path):
    """A tiny grid with two head blocks and a padded layout: one decode.csv row per variant and point."""
    import csv

    argv = ["bench", "decode", "--d-model", "2176", "--batch", "1", "--lengths", "4096", "--ranks", "2,1,1",
            "--baselines", "--reference-max-len", "0", "--reps", "3", "--block-h", "16", "64", "--pad-a-heads", "1",
            "16", "--grid-only", "--output", str(tmp_path)]
    assert tpa.cli.main(argv) == 0
    with open(tmp_path / "decode.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "tpa"]
    assert [(r["variant"], r["block_h"], r["a_heads"]) for r in rows] == [
        ("bh16", "16", "34"), ("bh64", "64", "34"), ("bh16-pad16", "16", "48"), ("bh64-pad16", "64", "48")]
    assert all(float(r["graph_us"]) > 0 for r in rows)
