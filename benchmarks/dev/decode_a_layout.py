"""The head-factor cache layout of the FlashTPA decode kernel at H = 34 (issue 12, point 2).

The kernel loads each cache block's head factors as a ``[heads, BLOCK_M tokens]`` tile. Stored
token-major (``[B, capacity, R, H]``, the default) a token's ``R x 34`` values are 68 or 136 bytes
apart, not a multiple of 16, so the loads split into small pieces; padding the rows to 48 heads
(``tpa_cache_head_multiple=16``) aligns them at 14% more memory. Stored head-major
(``[B, R, H, capacity]``, passed as the permuted view ``[B, capacity, R, H]`` with unit token stride)
each head's tokens are contiguous: a tile row is ``BLOCK_M`` consecutive values, aligned whenever
the capacity is a multiple of 8, at no extra memory. The kernel takes any strides, so the three
layouts run the same code.

Per point (H = 32 as the aligned yardstick, and H = 34; ranks (16,1,1) and (6,2,2); B 1, 8, 16;
32K and 128K tokens): GPU microseconds of one call replayed from a CUDA graph with the L2 flushed
(:func:`tpa.bench.timing.graph_replay_us`), the share of the copy bandwidth on the unpadded bytes,
and each layout's output against the default layout's (the same values, so they must agree to the
last bit but for summation order).

    python benchmarks/dev/decode_a_layout.py --out $OUT/a_layout
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import torch

from tpa.bench.decode.inputs import tpa_bytes, tpa_inputs
from tpa.bench.timing import Timer, copy_bandwidth, graph_replay_us
from tpa.ops.decode import DecodeLaunchOptions, tpa_decode

POINTS = [(b, n, h, r) for h in (32, 34) for r in ((16, 1, 1), (6, 2, 2)) for b in (1, 8, 16)
          for n in (32768, 131072)]


def _head_major(a: torch.Tensor) -> torch.Tensor:
    """The same values stored ``[B, R, H, capacity]``, seen as ``[B, capacity, R, H]``."""
    return a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def _padded(a: torch.Tensor, multiple: int) -> torch.Tensor:
    heads = -(-a.shape[-1] // multiple) * multiple
    buf = a.new_zeros(*a.shape[:-1], heads)
    buf[..., : a.shape[-1]] = a
    return buf[..., : a.shape[-1]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/decode_a_layout")))
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(torch)
    bw = copy_bandwidth(torch)
    print(f"copy bandwidth {bw:.0f} GB/s")
    padded_options = DecodeLaunchOptions(a_head_pad=16)
    rows = []
    for bsz, length, h, ranks in POINTS:
        base = list(tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16, capacity=length + 64))
        layouts = {"token-major": (base, None)}
        if h % 16:
            padded = list(base)
            padded[2], padded[4] = _padded(base[2], 16), _padded(base[4], 16)
            layouts["token-major, padded to 48"] = (padded, padded_options)
        head_major = list(base)
        head_major[2], head_major[4] = _head_major(base[2]), _head_major(base[4])
        layouts["head-major"] = (head_major, None)
        ideal_us = tpa_bytes(bsz, length, h, 64, ranks, 2) / (bw * 1e3)
        want = tpa_decode(*base[:7])
        for name, (inputs, options) in layouts.items():
            out = torch.empty_like(want)
            tpa_decode(*inputs[:7], out=out, options=options)
            err = (out.float() - want.float()).abs().max().item() / want.float().abs().max().item()
            us = graph_replay_us(torch, timer, lambda: tpa_decode(*inputs[:7], out=out, options=options), args.reps)
            row = dict(B=bsz, L=length, H=h, ranks=",".join(map(str, ranks)), layout=name,
                       us=None if us is None else round(us, 2),
                       copy_fraction=None if us is None else round(ideal_us / us, 3), rel_diff=round(err, 5))
            rows.append(row)
            print(json.dumps(row))
        base = layouts = want = None
        torch.cuda.empty_cache()
    with open(args.out / "a_layout.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out / 'a_layout.csv'}")


if __name__ == "__main__":
    main()
