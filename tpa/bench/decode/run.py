"""``tpa bench decode``'s run: the phases in order, their results written under ``--out``."""

from __future__ import annotations

import csv
import json
import os
import time

from tpa.bench.decode.check import check_correctness
from tpa.bench.decode.inputs import best_sdpa_variant, sdpa_decode_fn, tpa_bytes, tpa_inputs
from tpa.bench.decode.latency import batch1_latency, growing_run
from tpa.bench.decode.report import plot, summarize
from tpa.bench.decode.tune import sweep, tune
from tpa.bench.timing import Timer, copy_bandwidth, kernel_times


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

    if not torch.cuda.is_available():
        print("tpa bench decode needs a CUDA GPU")
        return 2
    from tpa.ops import tpa_decode, tpa_decode_reference
    from tpa.ops import decode as decode_mod

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

    ok = True
    if not args.skip_check:
        log("correctness on the GPU:")
        ok = check_correctness(torch, log)
        log(f"correctness: {'PASS' if ok else 'FAIL'}")

    timer = Timer(torch, mode=args.flush)
    log(f"L2 flush before timed calls: {args.flush}")
    if args.sweep:
        _guard(log, sweep, torch, timer, decode_mod, dtype, elt, bw, args.out, log)
        _guard(log, batch1_latency, torch, timer, tpa_decode, dtype, log)
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write("\n".join(log_lines) + "\n")
        return 0 if ok else 1
    ranks_list = [tuple(int(x) for x in r.split(",")) for r in args.ranks]
    lengths = []
    length = args.min_len
    while length <= args.max_len:
        lengths.append(length)
        length *= 2
    rows = []
    csv_path = os.path.join(args.out, "decode.csv")
    fields = ["method", "ranks", "kv_heads", "batch", "d_model", "heads", "length", "us", "bytes", "gbps",
              "frac_copy", "backend", "splits", "retimed_us"]
    free_margin = 0.85

    def fits(nbytes):
        free, _ = torch.cuda.mem_get_info()
        return nbytes < free_margin * free

    def record(**kw):
        kw["gbps"] = kw["bytes"] / (kw["us"] * 1e-6) / 1e9 if kw.get("us") else float("nan")
        kw["frac_copy"] = kw["gbps"] / bw
        rows.append(kw)
        log(f"  {kw['method']:<12} R={kw.get('ranks', ''):<8} B={kw['batch']:<3} H={kw['heads']:<3} "
            f"L={kw['length']:<7} {kw['us']:10.1f} us {kw['gbps']:8.0f} GB/s {kw['frac_copy']:6.1%}"
            + (f"  [{kw['backend']}]" if kw.get("backend") else "")
            + (f" splits={kw['splits']}" if kw.get("splits") else ""))

    if args.tune:
        log(f"[{time.perf_counter() - t_start:.0f} s] tune")
        _guard(log, tune, torch, timer, tpa_decode, decode_mod, dtype, elt, bw, log)
    log(f"launch heuristic in use: {decode_mod._HEURISTIC}")


    log(f"[{time.perf_counter() - t_start:.0f} s] grid (GPU time: CUDA events, L2 flushed before each call; median):")
    def grid():
        sdpa_choice = {}
        last_us = {}
        for d_model in args.d_model:
            h = d_model // args.head_dim
            d = args.head_dim
            for bsz in args.batch:
                # The strongest SDPA variant for each baseline at this (d_model, batch), picked at one length.
                pick_len = min(max(args.min_len, 1 << 14), args.max_len)
                for name in args.baselines:
                    kv = {"mha": h, "gqa4": 4, "mqa": 1}[name]
                    if fits(3 * bsz * kv * pick_len * d * elt):
                        best, times = best_sdpa_variant(torch, timer, bsz, pick_len, h, d, kv, dtype)
                        sdpa_choice[(name, d_model, bsz)] = best
                        log(f"  SDPA {name} B={bsz} H={h} L={pick_len}: "
                            + ", ".join(f"{k} {v:.1f} us" for k, v in sorted(times.items(), key=lambda x: x[1]))
                            + f" -> {best}")
                        torch.cuda.empty_cache()
                for length in lengths:
                    for ranks in ranks_list:
                        nbytes = tpa_bytes(bsz, length, h, d, ranks, elt)
                        if not fits(2 * nbytes):
                            log(f"  skip TPA{ranks} B={bsz} d_model={d_model} L={length}: does not fit")
                            continue
                        inputs = tpa_inputs(torch, bsz, length, h, d, ranks, dtype)
                        out = torch.empty(bsz, 1, h, d, dtype=dtype, device="cuda")
                        fn = lambda: tpa_decode(*inputs[:7], out=out)  # noqa: E731
                        us = timer.time(fn, reps=args.reps)
                        cfg = decode_mod.default_config(bsz, 1, h, d, d, length, props.multi_processor_count, elt,
                                                        None, ranks[1], ranks[2])
                        # anomaly: slower than 2.5x the previous TPA point of this batch (any ranks) scaled by bytes
                        key = (d_model, bsz)
                        retimed = ""
                        if key in last_us:
                            prev_us, prev_bytes = last_us[key]
                            expected = prev_us * max(1.0, nbytes / prev_bytes)
                            if us > 2.5 * expected:
                                retimed = [round(timer.time(fn, reps=args.reps), 1) for _ in range(2)]
                                log(f"  anomaly: TPA{ranks} B={bsz} L={length} took {us:.1f} us, expected about "
                                    f"{expected:.1f} us from the previous point; timed again: {retimed}; kernels: "
                                    f"{kernel_times(torch, fn)}")
                        last_us[key] = (us, nbytes)
                        record(method="tpa", ranks=",".join(map(str, ranks)), kv_heads="", batch=bsz, d_model=d_model,
                               heads=h, length=length, us=us, bytes=nbytes, backend="triton", splits=cfg.num_splits,
                               retimed_us=retimed)
                        if length <= args.reference_max_len:
                            try:
                                ref_fn = lambda: tpa_decode_reference(*inputs[:7])  # noqa: E731
                                us = timer.time(ref_fn, reps=5, budget_s=0.05)
                                record(method="reference", ranks=",".join(map(str, ranks)), kv_heads="", batch=bsz,
                                       d_model=d_model, heads=h, length=length, us=us, bytes=nbytes, backend="einsum")
                            except torch.cuda.OutOfMemoryError:
                                log(f"  reference OOM at B={bsz} L={length}")
                        inputs = out = None
                        torch.cuda.empty_cache()
                    for name in args.baselines:
                        kv = {"mha": h, "gqa4": 4, "mqa": 1}[name]
                        need = 2 * bsz * kv * length * d * elt
                        variant = sdpa_choice.get((name, d_model, bsz))
                        if variant is None or not fits(need):
                            log(f"  skip SDPA {name} B={bsz} d_model={d_model} L={length}: does not fit")
                            continue
                        fn, nbytes, tensors = sdpa_decode_fn(torch, bsz, length, h, d, kv, dtype, variant)
                        us = timer.time(fn, reps=args.reps)
                        record(method=f"sdpa_{name}", ranks="", kv_heads=kv, batch=bsz, d_model=d_model, heads=h,
                               length=length, us=us, bytes=nbytes, backend=variant)
                        del fn, tensors
                        torch.cuda.empty_cache()

    _guard(log, grid)
    log(f"[{time.perf_counter() - t_start:.0f} s] grid done")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    log(f"wrote {csv_path}")

    log(f"[{time.perf_counter() - t_start:.0f} s] latency")
    latency = _guard(log, batch1_latency, torch, timer, tpa_decode, dtype, log) or {}
    growing = _guard(log, growing_run, torch, timer, tpa_decode, decode_mod, dtype, args.growing_steps, log)
    growing = growing or {"summary": {}, "steps": []}
    with open(os.path.join(args.out, "latency.json"), "w") as f:
        json.dump({"copy_gbps": bw, "batch1_len4096": latency, "growing": growing["summary"], "correct": ok}, f,
                  indent=1)
    with open(os.path.join(args.out, "growing.csv"), "w") as f:
        f.write("step,length,plain_gpu_us,graph_gpu_us\n")
        for i, (length, us, gus) in enumerate(growing["steps"]):
            f.write(f"{i},{length},{us:.3f},{gus:.3f}\n")
    log(f"[{time.perf_counter() - t_start:.0f} s] plot")
    _guard(log, plot, rows, args.out, log)
    _guard(log, summarize, rows, bw, latency, growing["summary"], log)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    return 0 if ok else 1
