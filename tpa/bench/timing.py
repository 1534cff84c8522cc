"""GPU timing for the benchmarks: CUDA-event timing with the L2 cache flushed, per-kernel profiler
times, host time per call and the device-to-device copy bandwidth (the ceiling of a memory-bound
kernel). Every benchmark times through this module (``tpa bench decode``, ``benchmarks/dev/``)."""

from __future__ import annotations

import statistics
import time


class Timer:
    """CUDA-event timing of GPU execution, with the L2 cache flushed before each call (a buffer of
    4x L2 read, ``mode="read"``, or rewritten, ``mode="write"``). After the flush the stream also
    sleeps ~``ahead_us`` so that the host has enqueued the whole call before the start event fires:
    the events then measure GPU time, not host launch overhead (:func:`host_time` measures that).

    A rewrite leaves the L2 full of dirty lines (50 MB on an H100) that the timed call's own reads
    must first write back to memory; a read leaves clean lines, as a decode step finds the L2 after
    the previous layer's cache reads. Both evict the data the call reads."""

    def __init__(self, torch, ahead_us=300.0, mode="read"):
        if mode not in ("read", "write"):
            raise ValueError(f"flush mode must be 'read' or 'write', got {mode!r}")
        self.torch = torch
        self.mode = mode
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
        self.flush_buf = torch.ones(max(256 << 20, 4 * l2) // 4, dtype=torch.int32, device="cuda")
        clock_mhz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 1_980_000) / 1e3
        self.sleep_cycles = int(ahead_us * clock_mhz)

    def flush(self):
        if self.mode == "read":
            self.flush_buf.sum()
        else:
            self.flush_buf.zero_()

    def time(self, fn, reps=20, warmup=3, flush=True, budget_s=0.25, ahead=True):
        """Median microseconds of ``fn()`` over ``reps`` calls (fewer if one call is slow)."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = time.perf_counter() - t0
        reps = max(3, min(reps, int(budget_s / max(one, 1e-6))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush:
                self.flush()
            if ahead:
                torch.cuda._sleep(self.sleep_cycles)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        return statistics.median(times)


def kernel_times(torch, fn, calls=5):
    """Mean GPU microseconds per call of each kernel ``fn`` launches (torch.profiler), as a dict."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        if evt.device_time_total > 0:
            out[evt.key[:40]] = round(evt.device_time_total / calls, 1)
    return out


def host_time(torch, fn, n=1000):
    """Wall-clock microseconds per call of ``n`` back-to-back calls (bounded by host overhead when
    the GPU work is shorter than the launch path)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def eager_host_us(torch, fn, n=300):
    """Host microseconds of one eager call: ``n`` calls back to back timed with ``perf_counter``
    without waiting for the GPU (the syncs before and after lie outside the timed span)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def graph_replay(torch, timer, fn, reps):
    """``(us, None)``: GPU microseconds of one call replayed from a CUDA graph (``timer``: L2 flushed);
    ``(None, why)`` where the call cannot be captured (the exception's type and message)."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001  # a capture failure is a result, not a crash
        return None, f"{type(exc).__name__}: {exc}"
    return timer.time(graph.replay, reps=reps), None


def graph_replay_us(torch, timer, fn, reps):
    """GPU microseconds of one call replayed from a CUDA graph (``timer``: L2 flushed), or None
    where the call cannot be captured."""
    return graph_replay(torch, timer, fn, reps)[0]


def copy_bandwidth(torch, nbytes=1 << 30, reps=20):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def median_ms(fn, reps=20, warmup=3, cuda=True):
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup``: CUDA events around each
    call on a GPU (no L2 flush; :class:`Timer` flushes), wall-clock time per call otherwise."""
    import torch

    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)
