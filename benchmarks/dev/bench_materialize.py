"""Fused Q/K/V materialisation (tpa.ops.fused_materialize) against the einsum reference on one GPU.

At the ``small`` preset's training shapes (micro-batch 16, sequence 1024, 34 heads, head_dim 64,
R_q = 6 and R_k = R_v = 2, bf16), with factors sliced from one fused projection output as the layer
produces them:

1. times forward and forward+backward of: the reference einsum eager, the reference under
   ``torch.compile``, the fused op eager and under ``torch.compile`` (CUDA events, median after
   warm-up), with the achieved bandwidth of the op's minimal traffic
   (forward ``R(H+D) + HD`` elements per token, backward ``HD + 2R(H+D)``) (the op's
   correctness at these shapes is a test: ``python -m pytest -m gpu tests/ops``);
2. times one compiled ``small`` TPA transformer block forward+backward (bf16 autocast) with the
   fused op and with the reference, and checks that both give the same output and gradients;
3. with ``--sweep``, times the fused kernels over launch configurations (tensor-core or FMA
   products, tokens and heads per program, warps) and reports the fastest;
4. with ``--profile``, a profiler table of the compiled block with the fused op.

Every measurement is guarded: a failure prints its traceback and is recorded, the rest still runs.
Results go to ``materialize.json`` and ``materialize.txt`` under ``--out`` (default ``$OUT``).

    python benchmarks/dev/bench_materialize.py --out $OUT            # about 2 minutes on an H100
    python benchmarks/dev/bench_materialize.py --quick --sweep        # fewer repetitions, R=6 only, + sweep (~1 min)
    python benchmarks/dev/bench_materialize.py --device cpu           # smoke run: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/bench_materialize")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run of every code path on tiny shapes through Triton's interpreter")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, R=6 only for the op timings")
    p.add_argument("--sweep", action="store_true", help="also time the kernels over launch configurations")
    p.add_argument("--profile", action="store_true", help="also profile the compiled block with the fused op")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile variants (auto: on CUDA only)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 16; 2 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024; 8 on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30, quick 10)")
    return p.parse_args(argv)


class Bench:
    """Shapes, timing and the record of results."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.batch = args.batch or (16 if self.cuda else 2)
        self.seq = args.seq or (1024 if self.cuda else 8)
        self.heads, self.dim = 34, 64
        self.reps = args.reps or (30 if self.cuda and not args.quick else (10 if self.cuda else 3))
        self.compile = args.compile == "on" or (args.compile == "auto" and self.cuda)
        self.results: dict = {"op": [], "block": [], "sweep": [], "errors": []}
        self.lines: list[str] = []
        self._compiled: dict = {}

    def op(self, impl: str):
        """The op as called in the timings: ``impl`` is "fused" or "reference", then "eager" or
        "compiled" (one ``torch.compile`` wrapper per op, shared by the checks and the timings)."""
        from tpa.ops.fused_materialize import tpa_materialize
        from tpa.ops.naive import materialize as reference

        kind, mode = impl.split()
        fn = functools.partial(tpa_materialize, backend="triton") if kind == "fused" else reference
        if mode == "eager":
            return fn
        if kind not in self._compiled:
            self._compiled[kind] = self.torch.compile(fn, fullgraph=True)
        return self._compiled[kind]

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def guard(self, name: str, fn):
        """Run one measurement; on failure print and record the traceback and go on."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001  # one failure must not lose the other measurements
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            self.results["errors"].append({"name": name, "error": f"{type(err).__name__}: {err}"[:2000], "traceback": tb})
            self.log(f"  {name}: FAILED ({type(err).__name__}: {str(err)[:200]})")
            return None

    def time_ms(self, fn, warmup: int = 3) -> float:
        from tpa.bench.timing import median_ms

        return median_ms(fn, reps=self.reps, warmup=warmup, cuda=self.cuda)

    # ------------------------------------------------------------------ inputs

    def factors(self, rank: int, seed: int = 0):
        """``a [B, T, R, H]`` and ``b [B, T, R, D]`` sliced from one ``[B, T, width]`` bf16 buffer
        laid out like the small preset's fused projection (width 980), as leaves that need grads."""
        torch = self.torch
        g = torch.Generator(device=self.dev).manual_seed(seed)
        width = 6 * (self.heads + self.dim) + 2 * 2 * (self.heads + self.dim)
        offset = {6: 0, 2: 6 * (self.heads + self.dim)}.get(rank, 0)
        assert offset + rank * (self.heads + self.dim) <= width
        buf = torch.randn(self.batch, self.seq, width, device=self.dev, generator=g, dtype=torch.bfloat16)
        a = buf[..., offset: offset + rank * self.heads].unflatten(-1, (rank, self.heads))
        b = buf[..., offset + rank * self.heads: offset + rank * (self.heads + self.dim)].unflatten(-1, (rank, self.dim))
        grad = torch.randn(self.batch, self.seq, self.heads, self.dim, device=self.dev, generator=g, dtype=torch.bfloat16)
        return a.requires_grad_(True), b.requires_grad_(True), grad

    def bytes_fwd_bwd(self, rank: int) -> tuple[int, int]:
        tokens, h, d = self.batch * self.seq, self.heads, self.dim
        return 2 * tokens * (rank * (h + d) + h * d), 2 * tokens * (h * d + 2 * rank * (h + d))


# ---------------------------------------------------------------------------------------------
# 1. op timings
# ---------------------------------------------------------------------------------------------


def time_op(bench: Bench, rank: int, impl: str) -> None:
    torch = bench.torch
    a, b, grad = bench.factors(rank, seed=10 + rank)
    fn = bench.op(impl)

    def fwd():
        with torch.no_grad():
            return fn(a, b)

    def fwd_bwd():
        out = fn(a, b)
        return torch.autograd.grad(out, (a, b), grad)

    fwd_bytes, bwd_bytes = bench.bytes_fwd_bwd(rank)
    row = {"rank": rank, "impl": impl}
    row["fwd_ms"] = bench.time_ms(fwd)
    row["fwd_bwd_ms"] = bench.time_ms(fwd_bwd)
    row["fwd_GBps"] = fwd_bytes / row["fwd_ms"] / 1e6
    row["fwd_bwd_GBps"] = (fwd_bytes + bwd_bytes) / row["fwd_bwd_ms"] / 1e6
    bench.results["op"].append(row)
    bench.log(f"  R={rank} {impl:17s} fwd {row['fwd_ms'] * 1e3:8.1f} us ({row['fwd_GBps']:7.0f} GB/s)   "
              f"fwd+bwd {row['fwd_bwd_ms'] * 1e3:8.1f} us ({row['fwd_bwd_GBps']:7.0f} GB/s)")


# ---------------------------------------------------------------------------------------------
# 3. one transformer block
# ---------------------------------------------------------------------------------------------


def make_block(bench: Bench):
    torch = bench.torch
    from tpa.layers import AttentionContext
    from tpa.models.t6.configuration_t6 import T6Config
    from tpa.models.t6.modeling_t6 import T6DecoderLayer
    from tpa.modules import RotaryEmbedding

    preset = "small" if bench.cuda else "tiny"
    config = T6Config.from_preset(preset, attention_type="tpa")
    torch.manual_seed(0)
    block = T6DecoderLayer(config, out_init_std=0.02).to(bench.dev)
    positions = torch.arange(bench.seq, device=bench.dev).expand(bench.batch, bench.seq)
    cos, sin = RotaryEmbedding(config.head_dim)(positions)
    ctx = AttentionContext(cos=cos, sin=sin)
    x = torch.randn(bench.batch, bench.seq, config.hidden_size, device=bench.dev)
    grad = torch.randn_like(x)
    return config, block, ctx, x, grad


def run_block(bench: Bench, block, ctx, x, grad, variant: str):
    """Compile (when enabled) and time forward+backward of the block with one materialize variant."""
    torch = bench.torch
    import tpa.layers.tpa as tpa_layer
    from tpa.ops.fused_materialize import tpa_materialize_many

    backend = "triton" if variant == "fused" else "reference"
    original = tpa_layer.tpa_materialize_many
    tpa_layer.tpa_materialize_many = functools.partial(tpa_materialize_many, backend=backend)
    try:
        torch._dynamo.reset()
        fn = torch.compile(block) if bench.compile else block
        x = x.detach().requires_grad_(True)
        autocast = torch.autocast(bench.dev.type, dtype=torch.bfloat16)

        def step():
            block.zero_grad(set_to_none=True)
            x.grad = None
            with autocast:
                out = fn(x, ctx)
            out.backward(grad.to(out.dtype))
            return out

        t0 = time.perf_counter()
        out = step()
        if bench.cuda:
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        ms = bench.time_ms(step, warmup=2)
        out = step()
        grads = {n: p.grad.detach().float().clone() for n, p in block.named_parameters()}
        return ms, first_s, out.detach().float(), x.grad.detach().float().clone(), grads
    finally:
        tpa_layer.tpa_materialize_many = original


def time_block(bench: Bench) -> None:
    config, block, ctx, x, grad = make_block(bench)
    tokens = bench.batch * bench.seq
    runs = {}
    for variant in ("reference", "fused"):
        res = bench.guard(f"block {variant}", lambda: run_block(bench, block, ctx, x, grad, variant))
        if res is None:
            continue
        ms, first_s, out, xgrad, grads = res
        runs[variant] = (out, xgrad, grads)
        row = {"variant": variant, "compiled": bench.compile, "fwd_bwd_ms": ms, "first_call_s": first_s,
               "tokens_per_s_per_block": tokens / ms * 1e3,
               "preset": "small" if bench.cuda else "tiny", "heads": config.num_attention_heads}
        bench.results["block"].append(row)
        bench.log(f"  block {variant:9s} fwd+bwd {ms:7.3f} ms  ({row['tokens_per_s_per_block']:,.0f} tok/s per block; "
                  f"first call incl. compile {first_s:.1f} s)")
    if len(runs) == 2:
        (o1, x1, g1), (o2, x2, g2) = runs["reference"], runs["fused"]

        def rel(u, v):
            return ((u - v).norm() / v.norm().clamp_min(1e-30)).item()

        agree = {"out": rel(o2, o1), "x_grad": rel(x2, x1), "param_grad_max": max(rel(g2[n], g1[n]) for n in g1)}
        ok = all(v < 5e-2 for v in agree.values())  # bf16-level agreement
        bench.results["block_agreement"] = {"relative_l2": agree, "ok": ok}
        bench.log(f"  block fused vs reference (relative L2, bf16 autocast): {'PASS' if ok else 'FAIL'} "
                  + ", ".join(f"{k} {v:.2e}" for k, v in agree.items()))
        ref_ms = next(r["fwd_bwd_ms"] for r in bench.results["block"] if r["variant"] == "reference")
        fused_ms = next(r["fwd_bwd_ms"] for r in bench.results["block"] if r["variant"] == "fused")
        layers = config.num_hidden_layers
        bench.results["block_speedup"] = ref_ms / fused_ms
        bench.log(f"  block speedup {ref_ms / fused_ms:.3f}x; {layers} layers save about "
                  f"{layers * (ref_ms - fused_ms):.2f} ms per micro-batch step of {tokens} tokens")


def profile_block(bench: Bench) -> None:
    torch = bench.torch
    import tpa.layers.tpa as tpa_layer
    from torch.profiler import ProfilerActivity, profile
    from tpa.ops.fused_materialize import tpa_materialize_many

    _, block, ctx, x, grad = make_block(bench)
    original = tpa_layer.tpa_materialize_many
    tpa_layer.tpa_materialize_many = functools.partial(tpa_materialize_many, backend="triton")
    try:
        torch._dynamo.reset()
        fn = torch.compile(block) if bench.compile else block
        x = x.detach().requires_grad_(True)

        def step():
            with torch.autocast(bench.dev.type, dtype=torch.bfloat16):
                out = fn(x, ctx)
            out.backward(grad.to(out.dtype))

        for _ in range(2):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if bench.cuda:
                torch.cuda.synchronize()
    finally:
        tpa_layer.tpa_materialize_many = original
    key = "cuda_time_total" if bench.cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    bench.results["profile_table"] = table
    bench.log(table)


# ---------------------------------------------------------------------------------------------
# 4. launch-configuration sweep
# ---------------------------------------------------------------------------------------------


def sweep(bench: Bench, rank: int) -> None:
    torch = bench.torch
    from tpa.ops.fused_materialize import MaterializeConfig, default_configs, materialize_bwd_triton, materialize_fwd_triton

    a, b, grad = bench.factors(rank, seed=20 + rank)
    a, b = a.detach(), b.detach()
    fwd_bytes, bwd_bytes = bench.bytes_fwd_bwd(rank)
    default_fwd, default_bwd = default_configs(bench.heads, bench.dim, torch.bfloat16)
    candidates = [MaterializeConfig(bt, bh, w, True) for bh in (16, 64) for bt in (1, 2, 4, 8) for w in (4, 8)]
    candidates += [MaterializeConfig(bt, bh, 4, False) for bh in (8, 64) for bt in (1, 4)]
    if not bench.cuda:  # the interpreter: a few, to exercise the code
        candidates = candidates[:2] + candidates[-1:]
    candidates += [c for c in (default_fwd, default_bwd) if c not in candidates]
    for kind, default, nbytes in (("fwd", default_fwd, fwd_bytes), ("bwd", default_bwd, bwd_bytes)):
        best = None
        for cfg in candidates:
            if cfg.block_t * cfg.block_h * 64 > 32768:
                continue
            if kind == "fwd":
                call = functools.partial(materialize_fwd_triton, [a], [b], [1.0 / rank], cfg)
            else:
                call = functools.partial(materialize_bwd_triton, [grad], [a], [b], [1.0 / rank], cfg)
            ms = bench.guard(f"sweep {kind} R={rank} {cfg}", lambda: bench.time_ms(call))
            if ms is None:
                continue
            row = {"kind": kind, "rank": rank, "config": cfg.__dict__, "ms": ms, "GBps": nbytes / ms / 1e6,
                   "default": cfg == default}
            bench.results["sweep"].append(row)
            if best is None or ms < best["ms"]:
                best = row
        if best is not None:
            dflt = next((r for r in bench.results["sweep"] if r["default"] and r["kind"] == kind and r["rank"] == rank), None)
            bench.log(f"  sweep {kind} R={rank}: best {best['config']} {best['ms'] * 1e3:.1f} us ({best['GBps']:.0f} GB/s)"
                      + (f"; default {dflt['ms'] * 1e3:.1f} us ({dflt['GBps']:.0f} GB/s)" if dflt else ""))


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # the interpreter is chosen when triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_materialize: no CUDA device; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    bench = Bench(args)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    bench.results["env"] = {
        "device": torch.cuda.get_device_name() if bench.cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "batch": bench.batch, "seq": bench.seq, "heads": bench.heads, "head_dim": bench.dim,
        "reps": bench.reps, "compile": bench.compile, "quick": args.quick,
    }
    bench.log(f"bench_materialize on {bench.results['env']['device']}: B={bench.batch} T={bench.seq} "
              f"H={bench.heads} D={bench.dim}, bf16, torch {torch.__version__}, triton {triton_version}")
    ranks = (6,) if args.quick else (6, 2)

    bench.log("1. op timings (median of CUDA events; GB/s of the minimal traffic)")
    impls = ["reference eager", "fused eager"] + (["reference compiled", "fused compiled"] if bench.compile else [])
    for rank in ranks:
        for impl in impls:
            bench.guard(f"op R={rank} {impl}", lambda: time_op(bench, rank, impl))

    bench.log("2. one small TPA block, forward+backward, bf16 autocast" + (", compiled" if bench.compile else ""))
    bench.guard("block", lambda: time_block(bench))

    if args.sweep:
        bench.log("3. launch-configuration sweep (eager kernels)")
        for rank in ranks:
            bench.guard(f"sweep R={rank}", lambda: sweep(bench, rank))
    if args.profile:
        bench.log("4. profile of the block with the fused op")
        bench.guard("profile", lambda: profile_block(bench))

    bench.results["elapsed_s"] = time.perf_counter() - t_start
    bench.log(f"done in {bench.results['elapsed_s']:.0f} s; {len(bench.results['errors'])} failed measurement(s)")
    with open(os.path.join(args.out, "materialize.json"), "w") as f:
        json.dump(bench.results, f, indent=1, default=str)
    with open(os.path.join(args.out, "materialize.txt"), "w") as f:
        f.write("\n".join(bench.lines) + "\n")
    agree = bench.results.get("block_agreement", {}).get("ok", True)
    return 0 if agree and not bench.results["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
