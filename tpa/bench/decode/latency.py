"""Decode latency at batch 1: plain launches, CUDA-graph replays, and a run whose cache grows by one
token per step."""

from __future__ import annotations

import math
import statistics
import time

from tpa.bench.decode.inputs import sdpa_decode_fn, tpa_bytes, tpa_inputs
from tpa.bench.timing import host_time, kernel_times


def _compiled_variants(kernel):
    """Number of compiled variants in a Triton JITFunction's cache (-1 if unknown)."""
    try:
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:
            return sum(len(v[0]) for v in caches.values())
        return sum(len(v) for v in kernel.cache.values())
    except Exception:  # noqa: BLE001  # version-dependent internals
        return -1


def batch1_latency(torch, timer, tpa_decode, dtype, log):
    """Batch 1, length 4096, H=32, d_h=64, ranks (16,1,1): plain launches and CUDA-graph replay."""
    from tpa.ops.decode import DecodeConfig, tpa_decode_triton

    inputs = tpa_inputs(torch, 1, 4096, 32, 64, (16, 1, 1), dtype)
    out = torch.empty(1, 1, 32, 64, dtype=dtype, device="cuda")
    fn = lambda: tpa_decode(*inputs[:7], out=out)  # noqa: E731
    res = {}
    res["plain_gpu_flushed_us"] = timer.time(fn, reps=200)
    res["plain_gpu_warm_us"] = timer.time(fn, reps=200, flush=False)
    res["plain_host_per_call_us"] = host_time(torch, fn)
    raw = lambda: tpa_decode_triton(*inputs[:7], None, 0.125, False, out=out)  # noqa: E731
    res["plain_host_per_call_backend_triton_us"] = host_time(torch, raw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    res["graph_gpu_flushed_us"] = timer.time(graph.replay, reps=200)
    res["graph_gpu_warm_us"] = timer.time(graph.replay, reps=200, flush=False)
    res["graph_host_per_replay_us"] = host_time(torch, graph.replay)
    graph10 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph10):
        for _ in range(10):
            fn()
    res["graph_10_calls_per_call_warm_us"] = timer.time(graph10.replay, reps=50, flush=False) / 10
    # One graph of back-to-back calls, each over its own cache (as the layers of a decode step are):
    # together the caches are four times the L2, so every call reads its cache from memory; the
    # graph launch is paid once for all of them (METHOD.md: rotate inputs, time graph replays).
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    per_set = tpa_bytes(1, 4096, 32, 64, (16, 1, 1), torch.tensor([], dtype=dtype).element_size())
    n_sets = max(8, math.ceil(4 * l2 / per_set))
    sets = [tpa_inputs(torch, 1, 4096, 32, 64, (16, 1, 1), dtype) for _ in range(n_sets)]
    outs = [torch.empty_like(out) for _ in range(n_sets)]
    rotating = torch.cuda.CUDAGraph()
    with torch.cuda.graph(rotating):
        for inp, o in zip(sets, outs):
            tpa_decode(*inp[:7], out=o)
    res["graph_rotating_caches"] = n_sets
    res["graph_rotating_per_call_us"] = timer.time(rotating.replay, reps=30) / n_sets
    del sets, outs, rotating
    for splits, warps in ((64, 4), (64, 2), (32, 2)):  # the launch heuristic's neighbours
        cfg = DecodeConfig(num_splits=splits, num_warps=warps)
        alt = torch.cuda.CUDAGraph()
        with torch.cuda.graph(alt):
            tpa_decode(*inputs[:7], out=out, config=cfg)
        res[f"graph_gpu_flushed_us_splits{splits}_warps{warps}"] = timer.time(alt.replay, reps=200)
    res["kernels_us"] = kernel_times(torch, fn)
    for name, kv in (("sdpa_mqa", 1), ("sdpa_gqa4", 4)):
        for variant in ("flash_rows", "cudnn_rows"):
            try:
                sfn, _, tensors = sdpa_decode_fn(torch, 1, 4096, 32, 64, kv, dtype, variant)
                res[f"{name}_{variant}_gpu_flushed_us"] = timer.time(sfn, reps=100)
            except RuntimeError:
                pass
    log("batch 1, length 4096, H=32, d_h=64, ranks (16,1,1):")
    for k, v in res.items():
        log(f"  {k:<42} {v:8.2f} us" if isinstance(v, float) else f"  {k:<42} {v}")
    return res


def growing_run(torch, timer, tpa_decode, decode_mod, dtype, steps, log):
    """``steps`` consecutive decode calls, cache length growing by one per step (batch 1, H=32):
    GPU time per step (plain launches, L2 flushed), host time per call (each step starts with an
    empty launch queue), and CUDA-graph replays of one graph captured before the first step.
    ``steps`` rows: (length, plain GPU us, graph GPU us, plain host us, replay host us)."""
    start = 4096
    inputs = list(tpa_inputs(torch, 1, start, 32, 64, (16, 1, 1), dtype, capacity=start + steps))
    seqlens = inputs[6]
    out = torch.empty(1, 1, 32, 64, dtype=dtype, device="cuda")
    tpa_decode(*inputs[:7], out=out)  # compile once
    torch.cuda.synchronize()
    from tpa.ops.decode_launch import _kernels

    split_kernel, merge_kernel = _kernels()
    before = (_compiled_variants(split_kernel), _compiled_variants(merge_kernel))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tpa_decode(*inputs[:7], out=out)

    def run(replay):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        wall = []
        for i in range(steps):
            # Each step enqueues ~2.5 ms of GPU work (flush, sleep) and ~0.05 ms of host work: without
            # this wait the launch queue fills within the run and the host time measures the GPU.
            torch.cuda.synchronize()
            seqlens.fill_(start + i + 1)
            timer.flush()
            torch.cuda._sleep(8 * timer.sleep_cycles)  # ~2.4 ms of host lead: GPU time, not host hiccups
            t0 = time.perf_counter()
            starts[i].record()
            if replay:
                graph.replay()
            else:
                tpa_decode(*inputs[:7], out=out)
            ends[i].record()
            wall.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)], wall

    plain, wall = run(False)
    graphed, graph_wall = run(True)
    after = (_compiled_variants(split_kernel), _compiled_variants(merge_kernel))
    med, gmed = statistics.median(plain), statistics.median(graphed)
    summary = {
        "steps": steps, "first_length": start + 1, "last_length": start + steps,
        "plain_median_us": med, "plain_max_us": max(plain), "plain_max_over_median": max(plain) / med,
        "graph_median_us": gmed, "graph_max_us": max(graphed), "graph_max_over_median": max(graphed) / gmed,
        "host_median_us": statistics.median(wall), "host_max_us": max(wall),
        "compiled_variants_before": before, "compiled_variants_after": after,
    }
    log(f"growing length {start + 1}..{start + steps} (batch 1, L2 flushed): plain launches GPU median {med:.2f} us, "
        f"max {max(plain):.2f} us ({max(plain) / med:.2f}x); graph replay median {gmed:.2f} us, max "
        f"{max(graphed):.2f} us ({max(graphed) / gmed:.2f}x); host per plain call median "
        f"{statistics.median(wall):.1f} us, max {max(wall):.1f} us; compiled variants (split, merge) "
        f"before {before}, after {after}")
    return {"summary": summary, "steps": [(start + i + 1, p, g, w, gw) for i, (p, g, w, gw)
                                          in enumerate(zip(plain, graphed, wall, graph_wall))]}
