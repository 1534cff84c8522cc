"""The Figure 5 grid of ``tpa bench decode``: for every d_model, batch, cache length and rank set, the
kernel, the reference twin (short caches) and the strongest SDPA variant of each baseline, timed with
CUDA events over a flushed L2. One :class:`Grid` holds the run's settings and its rows."""

from __future__ import annotations

import csv
import os

from tpa.bench.decode.inputs import (best_sdpa_variant, mla_bytes, mla_decode_fn, sdpa_decode_fn, tpa_bytes,
                                     tpa_inputs)
from tpa.bench.decode.variants import applies, padded_heads, variants_from_args
from tpa.bench.timing import eager_host_us, graph_replay_us, kernel_times

# us: plain launches (GPU time, CUDA events); host_us: host time of one eager call (no sync);
# graph_us: one call replayed from a CUDA graph (GPU time); both GPU times with the L2 flushed
# variant: the TPA launch variant (tpa.bench.decode.variants; "default": the heuristic's launch, unpadded
# caches), block_h/num_warps the launch's, a_pad the A layout's pad, a_heads the heads its A loads read
FIELDS = ["method", "ranks", "kv_heads", "batch", "d_model", "heads", "length", "us", "host_us", "graph_us",
          "bytes", "gbps", "frac_copy", "backend", "splits", "retimed_us", "variant", "block_h", "num_warps", "a_pad",
          "a_heads"]
FREE_MARGIN = 0.85  # a point runs when its tensors take less than this fraction of the free memory
KV_HEADS = {"mha": None, "gqa4": 4, "mqa": 1}  # None: as many KV heads as query heads
BASELINES = (*KV_HEADS, "mla")  # "mla": the absorbed decode over MLA's latent cache (no SDPA)


def grid_lengths(args) -> list[int]:
    """The cache lengths of the grid: ``args.lengths`` in their order, or every power of two from
    ``args.min_len`` to ``args.max_len``."""
    if getattr(args, "lengths", None):
        return list(args.lengths)
    lengths, length = [], args.min_len
    while length <= args.max_len:
        lengths.append(length)
        length *= 2
    return lengths


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
        self.variants = variants_from_args(args)
        self.lengths = grid_lengths(args)
        self.csv_path = None  # rewritten after every point when set (a run cut by a timeout keeps its rows)
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
                 + (f" splits={kw['splits']}" if kw.get("splits") else "")
                 + (f" {kw['variant']} (block_h={kw['block_h']} warps={kw['num_warps']} a_heads={kw['a_heads']})"
                    if kw.get("variant") else ""))

    def run(self):
        args = self.args
        for d_model in args.d_model:
            h, d = d_model // args.head_dim, args.head_dim
            for bsz in args.batch:
                self.pick_sdpa(d_model, bsz, h, d)
                for length in self.lengths:
                    for ranks in self.ranks_list:
                        self.tpa_point(d_model, bsz, h, d, length, ranks)
                        if self.csv_path:
                            self.write_csv(self.csv_path, quiet=True)
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
        """Every launch variant (:mod:`tpa.bench.decode.variants`) at one point, over caches allocated once
        per A layout."""
        torch = self.torch
        nbytes = tpa_bytes(bsz, length, h, d, ranks, self.elt)
        point = dict(ranks=",".join(map(str, ranks)), kv_heads="", batch=bsz, d_model=d_model, heads=h,
                     length=length, bytes=nbytes)
        for pad in dict.fromkeys(v.a_pad for v in self.variants):
            group = [v for v in self.variants if v.a_pad == pad and applies(v, h)]
            if not group:
                continue
            a_heads = padded_heads(h, pad)
            extra = bsz * length * (ranks[1] + ranks[2]) * (a_heads - h) * self.elt
            if not self.fits(2 * (nbytes + extra)):
                self.log(f"  skip TPA{ranks} B={bsz} d_model={d_model} L={length} pad={pad}: does not fit")
                continue
            inputs = tpa_inputs(torch, bsz, length, h, d, ranks, self.dtype, a_heads=a_heads)
            out = torch.empty(bsz, 1, h, d, dtype=self.dtype, device="cuda")
            for variant in group:
                self.tpa_variant(variant, inputs, out, point, ranks)
            inputs = out = None
            torch.cuda.empty_cache()

    def tpa_variant(self, variant, inputs, out, point, ranks):
        """One variant at one point: plain launches and graph replay; the default variant also host
        time, the anomaly check and the reference twin."""
        from tpa.ops.decode import DecodeConfig

        torch, args, timer = self.torch, self.args, self.timer
        bsz, h, length, d = point["batch"], point["heads"], point["length"], inputs[1].shape[-1]
        try:
            override, options = variant.config(DecodeConfig), variant.options(self.launch)
            cfg = self.decode_mod.default_config(bsz, 1, h, d, d, length, self.sms, self.elt, override, ranks[1],
                                                 ranks[2], heuristic=self.launch.heuristic)
            fn = lambda: self.tpa_decode(*inputs[:7], out=out, config=override, options=options)  # noqa: E731
            fn()
        except ValueError as exc:  # a variant this shape cannot take (say block_h 8 with one query)
            self.log(f"  skip TPA{ranks} B={bsz} H={h} L={length} {variant.label}: {exc}")
            return
        us = timer.time(fn, reps=args.reps)
        graph_us = graph_replay_us(torch, timer, fn, args.reps)
        host_us, retimed = None, ""
        if variant.is_default:
            host_us = eager_host_us(torch, fn)
            retimed = self.check_anomaly(fn, us, point, ranks)
        self.record(method="tpa", us=us, host_us=host_us, graph_us=graph_us, backend="triton", splits=cfg.num_splits,
                    retimed_us=retimed, variant=variant.label, block_h=cfg.block_h, num_warps=cfg.num_warps,
                    a_pad=variant.a_pad, a_heads=variant.load_heads(h), **point)
        if variant.is_default and length <= args.reference_max_len:
            try:
                ref_fn = lambda: self.tpa_decode_reference(*inputs[:7])  # noqa: E731
                self.record(method="reference", us=timer.time(ref_fn, reps=5, budget_s=0.05), backend="einsum",
                            **point)
            except torch.cuda.OutOfMemoryError:
                self.log(f"  reference OOM at B={bsz} L={length}")

    def check_anomaly(self, fn, us, point, ranks):
        """Time again (and list the kernels) when the point is slower than 2.5x the previous TPA point
        of its (d_model, batch), any ranks, scaled by bytes. Returns the new times or ""."""
        key, nbytes = (point["d_model"], point["batch"]), point["bytes"]
        retimed = ""
        if key in self.last_us:
            prev_us, prev_bytes = self.last_us[key]
            expected = prev_us * max(1.0, nbytes / prev_bytes)
            if us > 2.5 * expected:
                retimed = [round(self.timer.time(fn, reps=self.args.reps), 1) for _ in range(2)]
                self.log(f"  anomaly: TPA{ranks} B={point['batch']} L={point['length']} took {us:.1f} us, expected "
                         f"about {expected:.1f} us from the previous point; timed again: {retimed}; kernels: "
                         f"{kernel_times(self.torch, fn)}")
        self.last_us[key] = (us, nbytes)
        return retimed

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

    def write_csv(self, path, quiet=False):
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        os.replace(tmp, path)
        if not quiet:
            self.log(f"wrote {path}")
