"""Where the time of a FlashTPA decode call of 200-800 MB goes (issue 12, point 2: 90% of the copy
bandwidth whenever a call reads >= 200 MB), on a GPU.

At every point (H = 32, d_h = 64, bf16, ranks (16,1,1), (6,2,2), (16,2,2); batch x length giving 201,
403 and 805 MB of factors) and for each launch variant (the default launch; the same with one merge
program per row, as before the merge in slabs; twice the default's splits; with ``--sweep``, at the
first point of (16,1,1) and (6,2,2), every stage count x block x warps):

- ``iso_us``: one call replayed from a CUDA graph with the L2 flushed and the GPU idle before it
  (:class:`tpa.bench.timing.Timer`: what ``tpa bench decode`` reports as graph replay);
- ``b2b_us``: one call of a CUDA graph of ``--calls`` calls back to back over two cache sets in turn
  (each call reads at least four times the L2, so none finds its bytes there), replay time divided by
  the calls: how a model's decode step runs its layers' attention;
- ``split_us``, ``merge_us``: GPU time per call of the split kernel and of the merge kernel
  (torch.profiler over eager calls);
- ``read_iso_us``, ``read_b2b_us``: the fastest plain read of the same number of bytes, timed the same
  two ways: ``torch.sum`` of a bf16 buffer, and a Triton kernel streaming contiguous chunks with 2-16
  programs per SM; what any kernel that reads the cache once can reach;
- ``floor_iso_us``: the isolated timer's own cost, one graph replay of a one-element kernel.

``--compare-block-m M`` instead times the default launch against blocks of M tokens for rank-2 caches
over B 1-16 x L 4K-512K x H 32, 34 (:func:`compare_blocks`).

With ``--timeline``, also the default launch's per-program clock at the 201 MB points
(:attr:`tpa.ops.decode.DecodeLaunchOptions.timeline`): quantiles of when programs start, how long
their queries, loop and epilogue take, and when they end, from the first start.

Shares are of the device-to-device copy bandwidth measured in the same run (``copy_gbps``).

    python benchmarks/dev/decode_gap.py [--sweep] [--timeline] --out $OUT/gap
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch

from tpa.bench.decode.inputs import tpa_bytes, tpa_inputs
from tpa.bench.timing import Timer, copy_bandwidth, kernel_times
from tpa.ops import decode_launch
from tpa.ops.decode import DecodeConfig, DecodeHeuristic, DecodeLaunchOptions, default_config, tpa_decode

KB, MB = 1024, 1 << 20
POINTS = {  # ranks: (B, L) at 201, 403 and 805 MB of factors (H = 32, d_h = 64, bf16)
    (16, 1, 1): [(1, 512 * KB), (4, 128 * KB), (16, 32 * KB), (2, 512 * KB), (8, 128 * KB), (4, 512 * KB),
                 (16, 128 * KB)],
    (6, 2, 2): [(2, 128 * KB), (8, 32 * KB), (1, 512 * KB), (4, 128 * KB), (16, 32 * KB), (2, 512 * KB),
                (8, 128 * KB)],
}
POINTS[(16, 2, 2)] = POINTS[(6, 2, 2)]


def _stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def stream_read(X, OUT, n, chunk, BLOCK: tl.constexpr):
        """Sum of a contiguous chunk of ``X``: a read of ``chunk`` elements per program."""
        pid = tl.program_id(0)
        lo = pid.to(tl.int64) * chunk
        hi = tl.minimum(lo + chunk, n)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(lo, hi, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            acc += tl.load(X + idx, mask=idx < hi, other=0.0).to(tl.float32)
        tl.store(OUT + pid, tl.sum(acc, axis=0))

    return stream_read


def graph_of(fns) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fns`` called in order (warmed up first, outside the capture)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return graph


def back_to_back_us(fns, reps: int) -> float:
    """GPU microseconds per call of a graph of ``fns`` replayed ``reps`` times (median over replays)."""
    graph = graph_of(fns)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def read_roofline(timer, nbytes: int, calls: int, reps: int, sms: int) -> dict:
    """The fastest plain reads of ``nbytes`` (two buffers in turn), isolated and back to back."""
    stream_read = _stream_kernel()
    n = nbytes // 2
    bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    sink = torch.empty(16 * sms, device="cuda", dtype=torch.float32)
    best = {"read_iso_us": math.inf, "read_b2b_us": math.inf}
    readers = {"torch.sum": lambda x: (lambda: x.sum(dtype=torch.float32))}
    for per_sm in (2, 4, 8, 16):
        for block, warps in ((4096, 8), (8192, 8)):
            programs = per_sm * sms
            chunk = math.ceil(n / programs / block) * block

            def reader(x, programs=programs, chunk=chunk, block=block, warps=warps):
                return lambda: stream_read[(programs,)](x, sink, n, chunk, BLOCK=block, num_warps=warps)

            readers[f"triton {per_sm}/SM block {block}"] = reader
    for name, reader in readers.items():
        fns = [reader(bufs[i % 2]) for i in range(calls)]
        iso = timer.time(graph_of(fns[:1]).replay, reps=reps)
        b2b = back_to_back_us(fns, reps)
        if iso < best["read_iso_us"]:
            best.update(read_iso_us=round(iso, 2), read_iso_by=name)
        if b2b < best["read_b2b_us"]:
            best.update(read_b2b_us=round(b2b, 2), read_b2b_by=name)
    return best


WHOLE_ROWS = DecodeLaunchOptions(heuristic=DecodeHeuristic(merge_program_bytes=1 << 40))  # one merge program a row


A_DOT = DecodeLaunchOptions(a_dot=True)
A_LOADS = DecodeLaunchOptions(a_dot=False)  # the head factors loaded into registers, as before a_dot


def variants(default: DecodeConfig, sweep: bool, a_dot: bool = False
             ) -> list[tuple[str, DecodeConfig | None, DecodeLaunchOptions | None]]:
    """(label, config, options) of the launches timed at a point: the default launch (merge in slabs),
    the same with one merge program per row (as before the slabs) and twice the splits; with
    ``a_dot``, instead the default (head factors through ``tl.dot``, ``DecodeLaunchOptions.a_dot``)
    against plain loads of them (``a_dot=False``) and against ``a_dot`` at 2 and 3 stages, 1x, 1.5x and
    2x the splits; with
    ``sweep``, every stage count x block x warps too (the split count chosen for them)."""
    if a_dot:
        def splits(factor: float) -> int:
            return min(1024, round(factor * default.num_splits))

        out = [("default", None, None), ("a loads", None, A_LOADS)]
        for stages in (3, 2):
            for factor in (1.0, 1.5, 2.0):
                out.append((f"a_dot s{stages} x{factor}", DecodeConfig(num_stages=stages, num_splits=splits(factor)),
                            A_DOT))
        if sweep:  # blocks x stages x warps x splits (1, 1.25, 1.5 times the default's), and a register cap
            for block_m in (32, 64, 128):
                for stages in (2, 3, 4):
                    for warps in (2, 4):
                        for factor in (1.0, 1.25, 1.5):
                            out.append((f"a_dot m{block_m} s{stages} w{warps} x{factor}",
                                        DecodeConfig(block_m=block_m, num_stages=stages, num_warps=warps,
                                                     num_splits=splits(factor)), A_DOT))
            for cap in (168, 128):
                for factor in (1.5, 2.0):
                    out.append((f"a_dot s2 r{cap} x{factor}",
                                DecodeConfig(num_stages=2, num_splits=splits(factor), max_registers=cap), A_DOT))
        return out
    out = [("default", None, None), ("whole-row merge", None, WHOLE_ROWS),
           ("twice the splits", DecodeConfig(num_splits=min(1024, 2 * default.num_splits)), None)]
    if sweep:
        for stages in (2, 3, 4):
            for block_m in (32, 64, 128):
                for warps in (2, 4, 8):
                    out.append((f"s{stages} m{block_m} w{warps}",
                                DecodeConfig(block_m=block_m, num_warps=warps, num_stages=stages), None))
    return out


def decode_calls(sets, out, cfg, options, calls: int) -> list:
    """``calls`` decode calls over the cache ``sets`` in turn, all writing ``out``."""
    def call(s):
        return lambda: tpa_decode(*s[:7], out=out, config=cfg, options=options)

    return [call(sets[i % len(sets)]) for i in range(calls)]


def isolated_and_back_to_back_us(timer, fns, reps: int) -> tuple[float, float]:
    """``(isolated, back to back)`` GPU microseconds per call: one call replayed from a graph with the
    L2 flushed before it, and one call of a graph of all ``fns``."""
    return timer.time(graph_of(fns[:1]).replay, reps=reps), back_to_back_us(fns, reps)


def decode_point(timer, ranks, bsz, length, calls, reps, sms, sweep=False, a_dot=False, h=32) -> list[dict]:
    """The rows of one point: per launch variant, isolated and back-to-back graph replay and kernel times."""
    sets = [tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16) for _ in range(2)]
    out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
    default = default_config(bsz, 1, h, 64, 64, length, sms, 2, None, ranks[1], ranks[2])
    rows, seen = [], set()
    for label, cfg, options in variants(default, sweep, a_dot):
        resolved = default_config(bsz, 1, h, 64, 64, length, sms, 2, cfg, ranks[1], ranks[2])
        if (resolved, options) in seen:
            continue
        seen.add((resolved, options))
        decode_launch.clear_plans()
        fns = decode_calls(sets, out, cfg, options, calls)
        try:
            iso, b2b = isolated_and_back_to_back_us(timer, fns, reps)
        except Exception as exc:  # noqa: BLE001  # a configuration that does not compile is a result
            print(json.dumps({"label": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}), flush=True)
            continue
        kernels = kernel_times(torch, fns[0], calls=5)
        handle = next(reversed(decode_launch.PLANS.values())).plan.split_handle
        split_us = sum(v for k, v in kernels.items() if "split" in k)
        merge_us = sum(v for k, v in kernels.items() if "merge" in k)
        rows.append(dict(ranks=",".join(map(str, ranks)), H=h, B=bsz, L=length, label=label,
                         splits=resolved.num_splits, warps=resolved.num_warps, block_m=resolved.block_m,
                         stages=resolved.num_stages, programs=bsz * resolved.num_splits * math.ceil(h / resolved.block_h),
                         iso_us=round(iso, 2), b2b_us=round(b2b, 2), split_us=round(split_us, 2),
                         merge_us=round(merge_us, 2), registers=getattr(handle, "n_regs", None),
                         spills=getattr(handle, "n_spills", None),
                         shared=getattr(getattr(handle, "metadata", None), "shared", None)))
    return rows


def timeline(ranks, bsz, length, sms) -> dict:
    """When the default launch's programs start, finish their queries and their loop, and end (the
    kernel's clock, ns from the first start), one call right after a call on another cache set."""
    sets = [tpa_inputs(torch, bsz, length, 32, 64, ranks, torch.bfloat16) for _ in range(2)]
    out = torch.empty(bsz, 1, 32, 64, dtype=torch.bfloat16, device="cuda")
    options = DecodeLaunchOptions(timeline=True)
    decode_launch.clear_plans()
    for _ in range(3):
        for s in sets:
            tpa_decode(*s[:7], out=out, options=options)
    torch.cuda.synchronize()
    (entry,) = decode_launch.PLANS.values()
    t = entry.plan.times.cpu().double()
    start, query, loop, end, sm = (t[:, i] for i in range(5))
    t0 = start.min()
    per_sm = torch.bincount(sm.long(), minlength=sms)
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)

    def quantiles(x):
        return [round(v / 1e3, 2) for v in torch.quantile(x, q).tolist()]

    return dict(ranks=",".join(map(str, ranks)), B=bsz, L=length, programs=t.shape[0],
                quantiles="0, 10, 50, 90, 100%", start_us=quantiles(start - t0), query_us=quantiles(query - start),
                loop_us=quantiles(loop - query), epilogue_us=quantiles(end - loop), end_us=quantiles(end - t0),
                programs_per_sm=[int(per_sm.min()), int(per_sm.max())], sms_used=int((per_sm > 0).sum()))


def compare_blocks(args, timer, sms) -> None:
    """The default launch against ``DecodeConfig(block_m=args.compare_block_m)`` (the warps and splits
    the heuristic picks for that block), isolated and back to back, over B 1-16 x L 4K-512K x H 32, 34
    x ranks (6,2,2), (16,2,2): whether a rule for the rank-2 caches' block holds beyond one point."""
    rows = []
    for h in (32, 34):
        for ranks in ((6, 2, 2), (16, 2, 2)):
            for bsz in (1, 2, 4, 8, 16):
                for length in (4 * KB, 32 * KB, 128 * KB, 512 * KB):
                    sets = [tpa_inputs(torch, bsz, length, h, 64, ranks, torch.bfloat16) for _ in range(2)]
                    out = torch.empty(bsz, 1, h, 64, dtype=torch.bfloat16, device="cuda")
                    row = dict(H=h, ranks=",".join(map(str, ranks)), B=bsz, L=length,
                               MB=round(tpa_bytes(bsz, length, h, 64, ranks, 2) / 1e6, 1))
                    for tag, cfg in (("default", None), ("block", DecodeConfig(block_m=args.compare_block_m))):
                        resolved = default_config(bsz, 1, h, 64, 64, length, sms, 2, cfg, ranks[1], ranks[2])
                        decode_launch.clear_plans()
                        fns = decode_calls(sets, out, cfg, None, args.calls)
                        row[f"{tag}_launch"] = (f"m{resolved.block_m} w{resolved.num_warps} s{resolved.num_stages} "
                                                f"x{resolved.num_splits}")
                        iso, b2b = isolated_and_back_to_back_us(timer, fns, args.reps)
                        row[f"{tag}_iso_us"], row[f"{tag}_b2b_us"] = round(iso, 2), round(b2b, 2)
                    row["b2b_ratio"] = round(row["default_b2b_us"] / row["block_b2b_us"], 3)
                    row["iso_ratio"] = round(row["default_iso_us"] / row["block_iso_us"], 3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    sets = out = None
                    torch.cuda.empty_cache()
                    (args.out / f"block{args.compare_block_m}.json").write_text(json.dumps(rows, indent=1))


def shares(row: dict, nbytes: int, copy_gbps: float) -> dict:
    """The row's times as shares of the copy bandwidth (bytes read / time / copy bandwidth)."""
    ideal_us = nbytes / (copy_gbps * 1e3)
    keys = ("iso_us", "b2b_us", "split_us", "read_iso_us", "read_b2b_us")
    return {k.replace("_us", "_share"): round(ideal_us / row[k], 3) for k in keys if row.get(k)}


def write_table(path: Path, rows: list[dict], copy_gbps: float, floor_us: float) -> None:
    cols = ("ranks", "H", "B", "L", "MB", "label", "splits", "warps", "block_m", "stages", "iso_us", "iso_share", "b2b_us", "b2b_share",
            "split_us", "split_share", "merge_us", "registers", "spills", "shared", "read_iso_us", "read_iso_share", "read_b2b_us", "read_b2b_share")
    lines = [f"copy bandwidth {copy_gbps:.0f} GB/s; isolated timer's floor (one-element kernel) {floor_us:.2f} us",
             "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/decode_gap")))
    p.add_argument("--calls", type=int, default=8, help="calls per back-to-back graph")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ranks", nargs="+", default=["16,1,1", "6,2,2", "16,2,2"])
    p.add_argument("--sweep", action="store_true",
                   help="also every stage count (2-4) x block (32-128) x warps (2-8) at the first 201 MB point of "
                        "(16,1,1) and (6,2,2)")
    p.add_argument("--timeline", action="store_true",
                   help="also the split kernel's per-program clock (DecodeLaunchOptions.timeline) at the 201 MB points")
    p.add_argument("--heads", type=int, default=32, help="H of every point (the byte counts follow)")
    p.add_argument("--a-dot", action="store_true",
                   help="instead of the merge and split variants: the head factors through tl.dot (variants)")
    p.add_argument("--compare-block-m", type=int, default=None,
                   help="instead: the default launch against this block_m for rank-2 caches (compare_blocks)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = Timer(torch)
    if args.compare_block_m:
        return compare_blocks(args, timer, sms)
    copy_gbps = copy_bandwidth(torch)
    tiny = torch.zeros(1, device="cuda")
    floor_us = timer.time(graph_of([lambda: tiny.add_(1)]).replay, reps=args.reps)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s, isolated floor {floor_us:.2f} us", flush=True)
    rows, reads, timelines = [], {}, []
    for spec in args.ranks:
        ranks = tuple(int(x) for x in spec.split(","))
        for i, (bsz, length) in enumerate(POINTS[ranks]):
            nbytes = tpa_bytes(bsz, length, args.heads, 64, ranks, 2)
            mb = round(nbytes / 1e6)
            if mb not in reads:
                reads[mb] = read_roofline(timer, nbytes, args.calls, args.reps, sms)
                print(json.dumps({"MB": mb, **reads[mb]}), flush=True)
            if args.a_dot:  # the a_dot sweep: the first 201 MB point of (16,1,1) and (6,2,2), (6,2,2)'s B=1 403 MB one
                sweep = args.sweep and spec != "16,2,2" and (i == 0 or (i == 2 and spec == "6,2,2"))
            else:
                sweep = args.sweep and i == 0 and spec != "16,2,2"
            for row in decode_point(timer, ranks, bsz, length, args.calls, args.reps, sms, sweep, args.a_dot,
                                    args.heads):
                row.update(MB=mb, **reads[mb])
                row.update(shares(row, nbytes, copy_gbps))
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.timeline and mb < 300:
                timelines.append(dict(MB=mb, **timeline(ranks, bsz, length, sms)))
                print(json.dumps(timelines[-1]), flush=True)
            torch.cuda.empty_cache()
            (args.out / "gap.json").write_text(json.dumps(
                {"copy_gbps": copy_gbps, "floor_iso_us": floor_us, "rows": rows, "timelines": timelines}, indent=1))
            write_table(args.out / "gap.md", rows, copy_gbps, floor_us)
    print(f"wrote {args.out / 'gap.md'}")


if __name__ == "__main__":
    main()
