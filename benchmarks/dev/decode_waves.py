"""How many programs the split-KV decode kernel should launch: the split count and warps around the
points where the default launch slows down (issue 12).

On the H200 the default launch of ranks (16,1,1), H = 32, got slower per byte at B x L = 64K tokens
(B=2 at 32K, B=4 at 16K, B=8 at 8K: 25.1, 22.9, 21.6 us, against 16.2, 14.6, 14.2 us at half the
length), where the heuristic's target of 4 programs per SM makes 512 programs of two cache blocks
each. This script times, at each point, the default configuration and explicit split counts whose
total programs are 1, 2, 3 or 4 per SM (each with the default warps and with 2, 4 and 8), plain
launches under the CUDA-event timer with the L2 flushed (:class:`tpa.bench.timing.Timer`), and
prints the compiled split kernel's shared memory and registers per program (what bounds how many
programs an SM holds at once). It also covers the ``small`` preset's decode shape (H = 34, ranks
(6,2,2)) at B = 1 and 8, 32K tokens, which ``generate()`` runs.

    python benchmarks/dev/decode_waves.py --out $OUT/waves
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path

import torch

from tpa.bench.decode.inputs import tpa_bytes, tpa_inputs
from tpa.bench.timing import Timer
from tpa.ops import decode_launch
from tpa.ops.decode import DecodeConfig, default_config, tpa_decode

POINTS = [  # (B, L, H, ranks)
    (1, 32768, 32, (16, 1, 1)), (2, 16384, 32, (16, 1, 1)), (2, 32768, 32, (16, 1, 1)), (2, 65536, 32, (16, 1, 1)),
    (4, 8192, 32, (16, 1, 1)), (4, 16384, 32, (16, 1, 1)), (4, 32768, 32, (16, 1, 1)),
    (8, 4096, 32, (16, 1, 1)), (8, 8192, 32, (16, 1, 1)), (8, 16384, 32, (16, 1, 1)), (16, 8192, 32, (16, 1, 1)),
    (1, 32768, 34, (6, 2, 2)), (8, 32768, 34, (6, 2, 2)),
]


def _kernel_resources(plan) -> dict:
    handle = plan.split_handle
    meta = getattr(handle, "metadata", None)
    return {"shared": getattr(meta, "shared", None), "n_regs": getattr(handle, "n_regs", None)}


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV at ``path`` (columns: every key, in first-seen order)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/decode_waves")))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--pipeline", action="store_true",
                   help="instead: pipeline depth, block, warps and head blocks at the small preset's decode shapes "
                        "(H = 34, (6,2,2), 32K + 64 slots, B = 1 and 8), A caches of 34, 40 and 48 heads")
    p.add_argument("--registers", action="store_true",
                   help="instead: a register cap (DecodeConfig.max_registers) and the split count at the small "
                        "preset's decode shapes, A caches of 34 and 40 heads")
    p.add_argument("--occupancy", action="store_true",
                   help="instead: the default split count against whole waves of resident programs (1, 2, 3 per "
                        "SM's worth of what fits at once), B 1-16 x L 32K-512K x H 32, 34 x ranks (16,1,1), "
                        "(6,2,2), (16,2,2)")
    p.add_argument("--small-heads", action="store_true",
                   help="instead: split count x block x warps x stages at H = 16 (d_model 1024), B = 1 and 2, "
                        "32K-256K tokens, ranks (16,1,1), and H = 32 at B = 1, 128K (the Figure 5 points where "
                        "the official kernel came closest)")
    args = p.parse_args()
    if args.small_heads:
        return small_heads(args)
    if args.occupancy:
        return occupancy(args)
    if args.pipeline:
        return pipeline(args)
    if args.registers:
        return registers(args)
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    smem = getattr(props, "shared_memory_per_multiprocessor", None)
    print(f"{props.name}: {sms} SMs, shared memory per SM {smem}, registers per SM "
          f"{getattr(props, 'regs_per_multiprocessor', None)}")
    timer = Timer(torch)
    rows = []
    for bsz, length, h, ranks in POINTS:
        inputs = tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16)
        out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
        default = default_config(bsz, 1, h, 64, 64, length, sms, 2, None, ranks[1], ranks[2])
        base = bsz * math.ceil(h / default.block_h)
        blocks = math.ceil(length / default.block_m)
        ideal_us = tpa_bytes(bsz, length, h, 64, ranks, 2) / 4.28e6
        configs = [("default", None)]
        for per_sm in (1, 2, 3, 4, 6):
            splits = max(1, min(256, blocks, per_sm * sms // base))
            splits = math.ceil(blocks / math.ceil(blocks / splits))
            for warps in (None, 2, 4, 8):
                configs.append((f"{per_sm}/SM", DecodeConfig(num_splits=splits, num_warps=warps)))
        seen = set()
        for label, cfg in configs:
            resolved = default_config(bsz, 1, h, 64, 64, length, sms, 2, cfg, ranks[1], ranks[2])
            if resolved in seen:
                continue
            seen.add(resolved)
            decode_launch.clear_plans()
            us = timer.time(lambda: tpa_decode(*inputs[:7], out=out, config=cfg), reps=args.reps)
            plans = [getattr(entry, "plan", None) for entry in decode_launch.PLANS.values()]
            res = _kernel_resources(plans[0]) if plans and plans[0] is not None else {}
            row = dict(B=bsz, L=length, H=h, ranks=",".join(map(str, ranks)), label=label,
                       splits=resolved.num_splits, programs=base * resolved.num_splits,
                       blocks_per_split=math.ceil(blocks / resolved.num_splits), warps=resolved.num_warps,
                       block_m=resolved.block_m, stages=resolved.num_stages, us=round(us, 2),
                       copy_fraction=round(ideal_us / us, 3), **res)
            rows.append(row)
            print(json.dumps(row))
        inputs = out = None
        torch.cuda.empty_cache()
    write_csv(args.out / "waves.csv", rows)


def pipeline(args) -> None:
    """Stages x block x warps, and head blocks in both grid orders, of the split kernel where
    ``generate()`` of the ``small`` preset decodes (H = 34, (6,2,2), 32K tokens, B = 1 and 8), for
    A caches of 34 heads (rows aligned to 2 elements) and padded to 40 (``tpa_cache_head_multiple=8``,
    16-byte rows) and 48 heads, each read as wide as its padding (``a_head_pad``)."""
    from tpa.ops.decode import DecodeLaunchOptions

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = Timer(torch)
    rows = []
    configs = [(None, False)] + [(DecodeConfig(num_stages=st, block_m=bm, num_warps=w), False)
                                 for st in (2, 3) for bm in (32, 64) for w in (4, 8)]
    configs += [(DecodeConfig(block_h=bh), inner) for bh in (16, 32) for inner in (False, True)]
    for bsz in (1, 8):
        length, capacity, h, ranks = 32768, 32768 + 64, 34, (6, 2, 2)
        ideal_us = tpa_bytes(bsz, length, h, 64, ranks, 2) / 4.28e6
        out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
        for pad in (1, 8, 16):
            heads = -(-h // pad) * pad
            inputs = tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16, capacity=capacity, a_heads=heads)
            for cfg, inner in configs:
                options = DecodeLaunchOptions(a_head_pad=pad, heads_inner=inner)
                resolved = default_config(bsz, 1, h, 64, 64, capacity, sms, 2, cfg, ranks[1], ranks[2])
                decode_launch.clear_plans()
                try:
                    us = timer.time(lambda: tpa_decode(*inputs[:7], out=out, config=cfg, options=options),
                                    reps=args.reps)
                except Exception as err:  # noqa: BLE001  # a configuration that does not compile (shared memory)
                    us = float("nan")
                    print(f"  {resolved} failed: {type(err).__name__}: {str(err)[:120]}")
                plans = [getattr(entry, "plan", None) for entry in decode_launch.PLANS.values()]
                res = _kernel_resources(plans[0]) if plans and plans[0] is not None else {}
                row = dict(B=bsz, L=length, H=h, ranks="6,2,2", a_heads=heads,
                           label="default" if cfg is None else "explicit", splits=resolved.num_splits,
                           block_h=resolved.block_h, heads_inner=inner, warps=resolved.num_warps,
                           block_m=resolved.block_m, stages=resolved.num_stages, us=round(us, 2),
                           copy_fraction=round(ideal_us / us, 3), **res)
                rows.append(row)
                print(json.dumps(row))
            inputs = None
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "pipeline.csv", rows)


def registers(args) -> None:
    """The split kernel at the ``small`` preset's decode shapes (H = 34, (6,2,2), 32K tokens) with its
    registers per thread capped (Triton's ``maxnreg``: at 168 or fewer, three 4-warp programs fit on
    an SM instead of two) and with 2 or 3 programs per SM's worth of splits, A caches of 34 and 40
    heads, each printed with its registers and shared memory."""
    from tpa.ops.decode import DecodeLaunchOptions

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = Timer(torch)
    rows = []
    for bsz in (1, 8):
        length, capacity, h, ranks = 32768, 32768 + 64, 34, (6, 2, 2)
        ideal_us = tpa_bytes(bsz, length, h, 64, ranks, 2) / 4.28e6
        out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
        split_choices = [None] if bsz == 1 else [None, 2 * sms // bsz, 3 * sms // bsz]
        for pad in (1, 8):
            heads = -(-h // pad) * pad
            inputs = tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16, capacity=capacity, a_heads=heads)
            options = DecodeLaunchOptions(a_head_pad=pad)
            for cap in (None, 168, 128):
                for splits in split_choices:
                    cfg = DecodeConfig(num_splits=splits, max_registers=cap)
                    resolved = default_config(bsz, 1, h, 64, 64, capacity, sms, 2, cfg, ranks[1], ranks[2])
                    decode_launch.clear_plans()
                    us = timer.time(lambda: tpa_decode(*inputs[:7], out=out, config=cfg, options=options),
                                    reps=args.reps)
                    plans = [getattr(entry, "plan", None) for entry in decode_launch.PLANS.values()]
                    res = _kernel_resources(plans[0]) if plans and plans[0] is not None else {}
                    row = dict(B=bsz, L=length, H=h, ranks="6,2,2", a_heads=heads, max_registers=cap,
                               splits=resolved.num_splits, block_m=resolved.block_m, stages=resolved.num_stages,
                               warps=resolved.num_warps, us=round(us, 2), copy_fraction=round(ideal_us / us, 3),
                               **res)
                    rows.append(row)
                    print(json.dumps(row))
            inputs = None
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "registers.csv", rows)


SMALL_HEAD_POINTS = [(1, 32768, 16), (1, 65536, 16), (1, 131072, 16), (1, 262144, 16), (2, 131072, 16),
                     (1, 131072, 32)]  # (B, L, H), ranks (16,1,1)


def small_heads(args) -> None:
    """Every combination of split count (the default's and 128-1024), block of 32-128 tokens, 1-4
    warps and 2-4 stages at :data:`SMALL_HEAD_POINTS`: plain launches, L2 flushed, GPU time. A
    configuration that does not compile (shared memory) is recorded as NaN."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = Timer(torch)
    rows = []
    for bsz, length, h in SMALL_HEAD_POINTS:
        ranks = (16, 1, 1)
        inputs = tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16)
        out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
        ideal_us = tpa_bytes(bsz, length, h, 64, ranks, 2) / 4.28e6
        default = default_config(bsz, 1, h, 64, 64, length, sms, 2, None, ranks[1], ranks[2])
        configs = [("default", None)] + [
            ("explicit", DecodeConfig(num_splits=sp, block_m=bm, num_warps=w, num_stages=st))
            for sp in (None, 128, 256, 512, 1024) for bm in (32, 64, 128) for w in (1, 2, 4) for st in (2, 3, 4)]
        here = []
        for label, cfg in configs:
            resolved = default_config(bsz, 1, h, 64, 64, length, sms, 2, cfg, ranks[1], ranks[2])
            decode_launch.clear_plans()
            try:
                us = timer.time(lambda: tpa_decode(*inputs[:7], out=out, config=cfg), reps=args.reps)
            except Exception as err:  # noqa: BLE001  # a configuration that does not compile
                us = float("nan")
                print(f"  {resolved} failed: {type(err).__name__}: {str(err)[:120]}")
            here.append(dict(B=bsz, L=length, H=h, label=label, splits=resolved.num_splits,
                             block_m=resolved.block_m, warps=resolved.num_warps, stages=resolved.num_stages,
                             us=round(us, 2), copy_fraction=round(ideal_us / us, 3)))
        rows += here
        fastest = sorted((r for r in here if r["us"] == r["us"]), key=lambda r: r["us"])[:5]  # NaN != NaN
        for r in fastest:
            print(json.dumps({**r, "default_us": here[0]["us"], "default": str(default)}))
        inputs = out = None
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "small_heads.csv", rows)


def resident_programs(props, shared: int, n_regs: int, warps: int) -> int:
    """Programs of one kernel an SM holds at once: the least of the shared-memory, register, warp and
    block limits (registers are allocated per warp in units of 256; each block reserves 1 KB of
    shared memory)."""
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    by_smem = smem // (shared + 1024) if shared else 32
    by_regs = regs // (warps * math.ceil(n_regs * 32 / 256) * 256) if n_regs else 32
    return max(1, min(32, 64 // warps, by_smem, by_regs))


def occupancy(args) -> None:
    """At each point, the default launch and split counts that fill whole waves of the programs an SM
    holds at once (:func:`resident_programs` of the default kernel): 1, 2 and 3 waves, each rounded
    to whole cache blocks per split, at most 256 splits (the heuristic's ``max_splits``), and one wave
    of up to 1024 splits (at least two blocks each), where that takes more than 256. Plain launches, L2 flushed (GPU time; at these sizes a call's
    host time is hidden)."""
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    timer = Timer(torch)
    rows = []
    for h in (32, 34):
        for ranks in ((16, 1, 1), (6, 2, 2), (16, 2, 2)):
            for bsz in (1, 2, 4, 8, 16):
                for length in (32768, 131072, 524288):
                    rows += _occupancy_point(args, timer, props, sms, bsz, length, h, ranks)
                    torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "occupancy.csv", rows)


def _occupancy_point(args, timer, props, sms, bsz, length, h, ranks) -> list[dict]:
    inputs = tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16)
    out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
    default = default_config(bsz, 1, h, 64, 64, length, sms, 2, None, ranks[1], ranks[2])
    base = bsz * math.ceil(h / default.block_h)
    blocks = math.ceil(length / default.block_m)
    ideal_us = tpa_bytes(bsz, length, h, 64, ranks, 2) / 4.28e6
    rows, resident, seen = [], None, set()
    for waves in (None, 1, 2, 3, "1, uncapped"):
        if waves is None:
            cfg = None
        else:
            cap = 1024 if waves == "1, uncapped" else 256  # beyond the heuristic's max_splits (B = 1 and 2)
            splits = max(1, min(cap, blocks // 2, (1 if cap > 256 else waves) * resident * sms // base))
            cfg = DecodeConfig(num_splits=math.ceil(blocks / math.ceil(blocks / splits)), num_warps=default.num_warps)
        resolved = default_config(bsz, 1, h, 64, 64, length, sms, 2, cfg, ranks[1], ranks[2])
        if resolved in seen:
            continue
        seen.add(resolved)
        decode_launch.clear_plans()
        us = timer.time(lambda: tpa_decode(*inputs[:7], out=out, config=cfg), reps=args.reps)
        plans = [getattr(entry, "plan", None) for entry in decode_launch.PLANS.values()]
        res = _kernel_resources(plans[0]) if plans and plans[0] is not None else {}
        if waves is None:
            resident = resident_programs(props, res.get("shared") or 0, res.get("n_regs") or 0, default.num_warps)
        programs = base * resolved.num_splits
        row = dict(B=bsz, L=length, H=h, ranks=",".join(map(str, ranks)),
                   label="default" if waves is None else f"{waves} wave(s)", splits=resolved.num_splits,
                   programs=programs, resident_per_sm=resident, waves=round(programs / (resident * sms), 2),
                   blocks_per_split=math.ceil(blocks / resolved.num_splits), warps=resolved.num_warps,
                   block_m=resolved.block_m, stages=resolved.num_stages, us=round(us, 2),
                   copy_fraction=round(ideal_us / us, 3), **res)
        rows.append(row)
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
