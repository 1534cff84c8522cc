"""``tpa bench decode``'s run: the phases in order, their results written under ``--out``."""

from __future__ import annotations

import json
import os
import time

from tpa.bench.decode.grid import Grid
from tpa.bench.decode.latency import batch1_latency, growing_run
from tpa.bench.decode.report import plot, summarize
from tpa.bench.decode.tune import sweep, tune
from tpa.bench.decode.variants import check_args
from tpa.bench.timing import Timer, copy_bandwidth


def _guard(log, fn, *args):
    """Run one phase; on an error log the traceback and go on with the next phase."""
    import traceback

    try:
        return fn(*args)
    except Exception:  # noqa: BLE001  # keep the other phases' numbers
        log(f"phase {fn.__name__} failed:\n{traceback.format_exc()}")
        return None


def main(args) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA backend-probe chatter

    check_args(args)
    if not torch.cuda.is_available():
        print("tpa bench decode needs a CUDA GPU")
        return 2
    from tpa.ops import decode as decode_mod
    from tpa.ops import tpa_decode
    from tpa.ops.decode import DecodeLaunchOptions

    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    log_lines = []

    def log(msg=""):
        print(msg, flush=True)
        log_lines.append(msg)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    elt = torch.tensor([], dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(0)
    import triton

    log(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {getattr(props, 'L2_cache_size', 0) >> 20} MB, "
        f"torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth(torch)
    log(f"device-to-device copy bandwidth: {bw:.0f} GB/s (read + write)")

    timer = Timer(torch, mode=args.flush)
    log(f"L2 flush before timed calls: {args.flush}")
    if args.sweep:
        _guard(log, sweep, torch, timer, decode_mod, dtype, elt, bw, args.out, log)
        _guard(log, batch1_latency, torch, timer, tpa_decode, dtype, log)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write("\n".join(log_lines) + "\n")
        return 0
    launch = DecodeLaunchOptions()
    if args.tune:
        log(f"[{time.perf_counter() - t_start:.0f} s] tune")
        winner = _guard(log, tune, torch, timer, tpa_decode, decode_mod, dtype, elt, bw, log)
        launch = DecodeLaunchOptions(heuristic=winner) if winner is not None else launch
    log(f"launch heuristic in use: {launch.heuristic}")

    log(f"[{time.perf_counter() - t_start:.0f} s] grid (GPU time: CUDA events, L2 flushed before each call; median):")
    grid = Grid(torch, args, timer, dtype, bw, log, launch)
    log(f"TPA launch variants: {', '.join(v.label for v in grid.variants)}")
    grid.csv_path = os.path.join(args.out, "decode.csv")
    _guard(log, grid.run)
    log(f"[{time.perf_counter() - t_start:.0f} s] grid done")
    grid.write_csv(grid.csv_path)
    rows = grid.rows
    if getattr(args, "grid_only", False):
        _guard(log, summarize, rows, bw, {}, {}, log)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write("\n".join(log_lines) + "\n")
        return 0

    log(f"[{time.perf_counter() - t_start:.0f} s] latency")
    latency = _guard(log, batch1_latency, torch, timer, tpa_decode, dtype, log) or {}
    growing = _guard(log, growing_run, torch, timer, tpa_decode, decode_mod, dtype, args.growing_steps, log)
    growing = growing or {"summary": {}, "steps": []}
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump({"copy_gbps": bw, "batch1_len4096": latency, "growing": growing["summary"]}, f,
                  indent=1)
    with open(os.path.join(args.out, "growing.csv"), "w") as f:
        f.write("step,length,plain_gpu_us,graph_gpu_us,plain_host_us,graph_host_us\n")
        for i, (length, us, gus, host, ghost) in enumerate(growing["steps"]):
            f.write(f"{i},{length},{us:.3f},{gus:.3f},{host:.3f},{ghost:.3f}\n")
    log(f"[{time.perf_counter() - t_start:.0f} s] plot")
    _guard(log, plot, rows, args.out, log)
    _guard(log, summarize, rows, bw, latency, growing["summary"], log)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    return 0
