"""Where the host time of one eager ``tpa_decode`` call goes (issue 12's 25 us target), on a GPU.

Each part is timed as ``tpa bench decode`` times ``host_us`` (:func:`tpa.bench.timing.eager_host_us`:
calls back to back, no sync inside the timed span), as the median of ``--repeats`` repeats of
``--calls`` calls, so that one noisy repeat does not make the figure:

- ``call``: ``tpa_decode(..., out=out)``, what ``tpa bench decode`` and the official comparison time
  (contiguous caches, and paged ones of 256-token pages at the last two points);
- ``call_no_out``: the same without ``out`` (the output allocated per call);
- ``entry_run``: the plan's launch closure alone (key, lookup and checks skipped);
- ``launches``: the compiled handles' launches alone, as the launch closure makes them
  (:func:`tpa.ops.decode_launch.launcher_of`: Triton's C launcher itself where that is supported), with
  their arguments prebuilt: Triton's launcher and the driver, what no Python of ours can remove;
- ``run_launches``: the same through the handles' ``run`` (Triton's ``CudaLauncher.__call__`` in front);
- ``empty``: one ``torch.empty`` of the output's shape (what ``call_no_out`` adds);
- ``sdpa``: PyTorch's SDPA decode call at the same B, H, L with d_h = 64 and gcd(H, 8) KV heads
  (GQA-4 at H = 32), the reference the issue names.

    python benchmarks/dev/decode_host_parts.py --out $OUT/host_parts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch

from tpa.bench.decode.inputs import tpa_inputs
from tpa.bench.timing import eager_host_us
from tpa.ops import decode_launch, tpa_decode

POINTS = [  # (B, L, H, ranks, page size or None)
    (1, 4096, 32, (16, 1, 1), None), (2, 32768, 32, (16, 1, 1), None), (8, 32768, 32, (16, 1, 1), None),
    (16, 16384, 32, (16, 1, 1), None), (1, 32768, 34, (6, 2, 2), None), (8, 32768, 34, (6, 2, 2), None),
    (16, 65536, 32, (16, 2, 2), None), (8, 32768, 32, (16, 1, 1), 256), (8, 32768, 34, (6, 2, 2), 256),
]


def median_host_us(fn, calls: int, repeats: int) -> float:
    return statistics.median(eager_host_us(torch, fn, n=calls) for _ in range(repeats))


def parts(bsz, length, h, ranks, page, calls, repeats) -> dict:
    inputs = tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16, paged_block=page)
    table = inputs[7]
    out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
    decode_launch.clear_plans()
    row = {"B": bsz, "L": length, "H": h, "ranks": ",".join(map(str, ranks)), "page": page}
    row["call_us"] = median_host_us(lambda: tpa_decode(*inputs[:7], block_table=table, out=out), calls, repeats)
    row["call_no_out_us"] = median_host_us(lambda: tpa_decode(*inputs[:7], block_table=table), calls, repeats)
    (entry,) = [e for e in decode_launch.PLANS.values() if e.plan is not None and e.plan.fast_run is not None][:1]
    plan = entry.plan
    row["splits"] = plan.num_splits
    ptrs = tuple(t.data_ptr() for t in inputs[:7]) + ((inputs[6] if table is None else table).data_ptr(),)
    args = (entry, *inputs[:7], table, out, ptrs, out.data_ptr())
    row["entry_run_us"] = median_host_us(lambda: entry.run(*args), calls, repeats)
    stream = torch.cuda.current_stream().cuda_stream
    split, merge = plan.split_handle, plan.merge_handle
    g0, g1, g2 = plan.split_grid
    ws = plan.workspace(stream) if plan.num_splits > 1 else (out, out, out.data_ptr(), out.data_ptr())
    split_ptrs = (*ptrs, out.data_ptr(), out.data_ptr(), ws[2], ws[3], ws[3], *plan.split_tail)
    merge_ptrs = (ws[2], ws[3], out.data_ptr(), out.data_ptr(), *plan.merge_tail)
    def through_run(handle):
        return handle.run, (handle.function, handle.packed_metadata, None, None, None)

    launcher_of = getattr(decode_launch, "launcher_of", through_run)  # (a tree before it: BASE= runs)
    merge = merge or split  # (not launched with one split)
    for name, (split_launch, split_fixed), (merge_launch, merge_fixed) in (
            ("launches", launcher_of(split), launcher_of(merge)),
            ("run_launches", through_run(split), through_run(merge))):
        split_args = (g0, g1, g2, stream, *split_fixed, *split_ptrs)
        merge_args = (*plan.merge_grid, 1, stream, *merge_fixed, *merge_ptrs)

        def launches():
            split_launch(*split_args)
            if plan.num_splits > 1:
                merge_launch(*merge_args)

        row[f"{name}_us"] = median_host_us(launches, calls, repeats)
    row["empty_us"] = median_host_us(lambda: torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda"),
                                     calls, repeats)
    q = torch.randn(bsz, h, 1, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(bsz, math.gcd(h, 8), length, 64, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["sdpa_us"] = median_host_us(lambda: sdpa(q, k, v, enable_gqa=True), calls, repeats)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/decode_host_parts")))
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for bsz, length, h, ranks, page in POINTS:
        row = parts(bsz, length, h, ranks, page, args.calls, args.repeats)
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    (args.out / "host_parts.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
