"""The Figure 5 grid of ``tpa bench decode``: for every d_model, batch, cache length and rank set, the
kernel, the reference twin (short caches) and the strongest SDPA variant of each baseline, timed with
CUDA events over a flushed L2. One :class:`Grid` holds the run's settings and its rows."""

from __future__ import annotations

import csv

from tpa.bench.decode.inputs import (best_sdpa_variant, mla_bytes, mla_decode_fn, sdpa_decode_fn, tpa_bytes,
                                     tpa_inputs)
from tpa.bench.timing import eager_host_us, graph_replay_us, kernel_times

# us: plain launches (GPU time, CUDA events); host_us: host time of one eager call (no sync);
# graph_us: one call replayed from a CUDA graph (GPU time); both GPU times with the L2 flushed
FIELDS = ["method", "ranks", "kv_heads", "batch", "d_model", "heads", "length", "us", "host_us", "graph_us",
          "bytes", "gbps", "frac_copy", "backend", "splits", "retimed_us"]
FREE_MARGIN = 0.85  # a point runs when its tensors take less than this fraction of the free memory
KV_HEADS = {"mha": None, "gqa4": 4, "mqa": 1}  # None: as many KV heads as query heads
BASELINES = (*KV_HEADS, "mla")  # "mla": the absorbed decode over MLA's latent cache (no SDPA)


class Grid:
    def __init__(self, torch, args, timer, dtype, bw, log, launch):
        from tpa.ops import decode as decode_mod
        from tpa.ops import tpa_decode, tpa_decode_reference

        self.torch, self.args, self.timer, self.dtype, self.bw, self.log = torch, args, timer, dtype, bw, log
        self.launch = launch  # DecodeLaunchOptions of the kernel (the tuned heuristic with --tune)
        self.elt = torch.tensor([], dtype=dtype).element_size()
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.decode_mod, self.tpa_decode, self.tpa_decode_reference = decode_mod, tpa_decode, tpa_decode_reference
        self.ranks_list = [tuple(int(x) for x in r.split(",")) for r in args.ranks]
        self.lengths = []
        length = args.min_len
        while length <= args.max_len:
            self.lengths.append(length)
            length *= 2
        self.rows = []
        self.sdpa_choice = {}  # (baseline, d_model, batch) -> SDPA variant
        self.last_us = {}  # (d_model, batch) -> (us, bytes) of the previous TPA point

    def fits(self, nbytes):
        free, _ = self.torch.cuda.mem_get_info()
        return nbytes < FREE_MARGIN * free

    def record(self, **kw):
        kw["gbps"] = kw["bytes"] / (kw["us"] * 1e-6) / 1e9 if kw.get("us") else float("nan")
        kw["frac_copy"] = kw["gbps"] / self.bw
        self.rows.append(kw)
        self.log(f"  {kw['method']:<12} R={kw.get('ranks', ''):<8} B={kw['batch']:<3} H={kw['heads']:<3} "
                 f"L={kw['length']:<7} {kw['us']:10.1f} us {kw['gbps']:8.0f} GB/s {kw['frac_copy']:6.1%}"
                 + (f"  host {kw['host_us']:.1f} us" if kw.get("host_us") is not None else "")
                 + (f"  graph {kw['graph_us']:.1f} us" if kw.get("graph_us") is not None else "")
                 + (f"  [{kw['backend']}]" if kw.get("backend") else "")
                 + (f" splits={kw['splits']}" if kw.get("splits") else ""))

    def run(self):
        args = self.args
        for d_model in args.d_model:
            h, d = d_model // args.head_dim, args.head_dim
            for bsz in args.batch:
                self.pick_sdpa(d_model, bsz, h, d)
                for length in self.lengths:
                    for ranks in self.ranks_list:
                        self.tpa_point(d_model, bsz, h, d, length, ranks)
                    for name in args.baselines:
                        if name == "mla":
                            self.mla_point(d_model, bsz, h, length)
                        else:
                            self.sdpa_point(d_model, bsz, h, d, length, name)

    def pick_sdpa(self, d_model, bsz, h, d):
        """The strongest SDPA variant for each baseline at this (d_model, batch), picked at one length."""
        torch, args = self.torch, self.args
        pick_len = min(max(args.min_len, 1 << 14), args.max_len)
        for name in args.baselines:
            if name == "mla":
                continue
            kv = KV_HEADS[name] or h
            if self.fits(3 * bsz * kv * pick_len * d * self.elt):
                best, times = best_sdpa_variant(torch, self.timer, bsz, pick_len, h, d, kv, self.dtype)
                self.sdpa_choice[(name, d_model, bsz)] = best
                self.log(f"  SDPA {name} B={bsz} H={h} L={pick_len}: "
                         + ", ".join(f"{k} {v:.1f} us" for k, v in sorted(times.items(), key=lambda x: x[1]))
                         + f" -> {best}")
                torch.cuda.empty_cache()

    def tpa_point(self, d_model, bsz, h, d, length, ranks):
        torch, args, timer = self.torch, self.args, self.timer
        nbytes = tpa_bytes(bsz, length, h, d, ranks, self.elt)
        if not self.fits(2 * nbytes):
            self.log(f"  skip TPA{ranks} B={bsz} d_model={d_model} L={length}: does not fit")
            return
        inputs = tpa_inputs(torch, bsz, length, h, d, ranks, self.dtype)
        out = torch.empty(bsz, 1, h, d, dtype=self.dtype, device="cuda")
        fn = lambda: self.tpa_decode(*inputs[:7], out=out, options=self.launch)  # noqa: E731
        us = timer.time(fn, reps=args.reps)
        host_us = eager_host_us(torch, fn)
        graph_us = graph_replay_us(torch, timer, fn, args.reps)
        cfg = self.decode_mod.default_config(bsz, 1, h, d, d, length, self.sms, self.elt, None, ranks[1], ranks[2],
                                             heuristic=self.launch.heuristic)
        # anomaly: slower than 2.5x the previous TPA point of this batch (any ranks) scaled by bytes
        key = (d_model, bsz)
        retimed = ""
        if key in self.last_us:
            prev_us, prev_bytes = self.last_us[key]
            expected = prev_us * max(1.0, nbytes / prev_bytes)
            if us > 2.5 * expected:
                retimed = [round(timer.time(fn, reps=args.reps), 1) for _ in range(2)]
                self.log(f"  anomaly: TPA{ranks} B={bsz} L={length} took {us:.1f} us, expected about "
                         f"{expected:.1f} us from the previous point; timed again: {retimed}; kernels: "
                         f"{kernel_times(torch, fn)}")
        self.last_us[key] = (us, nbytes)
        point = dict(ranks=",".join(map(str, ranks)), kv_heads="", batch=bsz, d_model=d_model, heads=h,
                     length=length, bytes=nbytes)
        self.record(method="tpa", us=us, host_us=host_us, graph_us=graph_us, backend="triton", splits=cfg.num_splits,
                    retimed_us=retimed, **point)
        if length <= args.reference_max_len:
            try:
                ref_fn = lambda: self.tpa_decode_reference(*inputs[:7])  # noqa: E731
                self.record(method="reference", us=timer.time(ref_fn, reps=5, budget_s=0.05), backend="einsum",
                            **point)
            except torch.cuda.OutOfMemoryError:
                self.log(f"  reference OOM at B={bsz} L={length}")
        inputs = out = None
        torch.cuda.empty_cache()

    def sdpa_point(self, d_model, bsz, h, d, length, name):
        torch = self.torch
        kv = KV_HEADS[name] or h
        variant = self.sdpa_choice.get((name, d_model, bsz))
        if variant is None or not self.fits(2 * bsz * kv * length * d * self.elt):
            self.log(f"  skip SDPA {name} B={bsz} d_model={d_model} L={length}: does not fit")
            return
        fn, nbytes, tensors = sdpa_decode_fn(torch, bsz, length, h, d, kv, self.dtype, variant)
        us = self.timer.time(fn, reps=self.args.reps)
        host_us = eager_host_us(torch, fn)
        graph_us = graph_replay_us(torch, self.timer, fn, self.args.reps)
        self.record(method=f"sdpa_{name}", ranks="", kv_heads=kv, batch=bsz, d_model=d_model, heads=h,
                    length=length, us=us, host_us=host_us, graph_us=graph_us, bytes=nbytes, backend=variant)
        del fn, tensors
        torch.cuda.empty_cache()

    def mla_point(self, d_model, bsz, h, length):
        torch = self.torch
        if not self.fits(2 * mla_bytes(bsz, length, h, self.elt) + 8 * bsz * h * length):  # + float32 scores
            self.log(f"  skip MLA B={bsz} d_model={d_model} L={length}: does not fit")
            return
        fn, nbytes, tensors = mla_decode_fn(torch, bsz, length, h, self.dtype)
        us = self.timer.time(fn, reps=self.args.reps)
        host_us = eager_host_us(torch, fn)
        graph_us = graph_replay_us(torch, self.timer, fn, self.args.reps)
        self.record(method="mla_absorbed", ranks="", kv_heads=1, batch=bsz, d_model=d_model, heads=h, length=length,
                    us=us, host_us=host_us, graph_us=graph_us, bytes=nbytes, backend="bmm")
        del fn, tensors
        torch.cuda.empty_cache()

    def write_csv(self, path):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        self.log(f"wrote {path}")
