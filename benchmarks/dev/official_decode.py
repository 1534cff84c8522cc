"""The paper's official FlashTPA decoding kernel (tensorgi/T6) beside ours, on the same inputs, in one run.

For every point of the grid (default: the paper's Figure 5 grid, bf16, d_h = 64: d_model 1024, 2048,
3072, i.e. H = 16, 32, 48; batch 1, 2, 4, 8, 16; cache lengths 2^12 .. 2^19; ranks (16, 1, 1)) one
set of random factors is made, the official kernel and :func:`tpa.ops.tpa_decode` both run on it,
both outputs are checked against our reference twin, then both are timed alike.

The official code is not part of this repository: ``--official-dir`` is a checkout of
https://github.com/tensorgi/T6, whose files are imported from there, unchanged:

- R_k = R_v = 1: ``tpa_decode_parallel_bn_triton`` of ``decode/flashtpa_decode_triton.py``;
- otherwise: ``tpa_decode_parallel_bn_triton`` of ``decode/flashtpa_decode_triton_multi_kvrank.py``.

Why ``bn`` (split over the sequence, then a log-sum-exp reduction): the checkout has no benchmark
script and its README names no variant (each file's ``__main__`` calls ``b``, ``bh`` and ``bn``); the
TPA decode benchmark of Doraemonzzz/xopes (a kernel library by one of the paper's authors, whose
``xopes.ops.flash_attn.tpa.tpa_decode_triton`` has these functions under the same names) times
``tpa_decode_parallel_bn_triton`` beside FlashAttention and FlashMLA, at the paper's kind of grid.
``--variant b`` (one program per sequence) or ``bh`` (per sequence and head) times the others.

Layouts (the official functions take contiguous tensors, ours any strides; one storage serves both):

- queries: official ``aq [B, 1, H, R_q]``, ``bq [B, 1, R_q, D]``; ours ``a_q = aq.transpose(2, 3)``
  ``[B, 1, R_q, H]`` (a view) and ``b_q = bq``;
- R_k = R_v = 1: official ``ak, av [B, M, H]``, ``bk [B, M, D]``, ``bv [B, M, E]``; ours the views
  ``x.unsqueeze(2)``, ``[B, M, 1, X]``: the same memory in both layouts;
- R_k or R_v > 1 (``--kv-layout``): the multi-kvrank function takes ``ak [B, M, H, R_k]``, ``bk [B, M,
  D, R_k]``, ``av [B, M, H, R_v]``, ``bv [B, M, E, R_v]`` and runs ``x.permute(0, 3, 1, 2).contiguous()``
  on each, i.e. its kernel reads rank planes ``[B, R, M, X]``. ``planar`` (default) stores the caches
  as those planes, so the official call copies nothing, and gives ours the views ``[B, M, R, X]``
  (rank stride M*X); ``token`` stores ours contiguous (token-major, as a model's cache is) and gives the
  official function the transposed views, which its wrapper copies on every call (timed: its cost).

Scales: both sides use their defaults, which agree: softmax scale D^-0.5 and the rank normalisations
1/R_q, 1/R_k, 1/R_v applied inside (the official single-rank file's defaults are 1/R_q, 1, 1).
All sequences have the full length M (the official functions take no lengths; ours gets
``cache_seqlens = M``).

Agreement: batch rows 0 and B-1 of both outputs against :func:`tpa.ops.naive.tpa_decode_reference` on
the same inputs upcast to float32; error = max |out - ref| / max |ref|, within 4 epsilons of the dtype
(bf16: 0.031; the official ``bn`` keeps its partial outputs and log-sum-exps in the input dtype). An
output that disagrees is timed all the same and its row marked ``MISMATCH``; a call that raises is
recorded (``FAILED``, its error) and the other side still timed; the script then exits 1.

Timings, the same for both, after the first call (which autotunes the official kernels: they tune
and compile per batch, heads and cache length):

- ``us``: plain launches, :class:`tpa.bench.timing.Timer` (CUDA events, L2 flushed before each call,
  the stream held ~300 us so that the host's launch work is hidden: GPU time), as ``tpa bench decode``;
- ``do_bench_us``: ``triton.testing.do_bench(fn, warmup=25, rep=100)`` (its default mean; L2 cleared
  before each call; the host's launch work hidden only as far as the clear's GPU time covers it), the
  timer of the xopes benchmark and of issue 12's figures;
- ``host_us``: eager host time of one call, 300 calls without a sync (:func:`tpa.bench.timing.eager_host_us`);
- ``graph_us``: one call replayed from a CUDA graph (:func:`tpa.bench.timing.graph_replay`; where the
  capture fails, ``graph_note`` says why).

``ratio = official / ours`` (>= 1: ours at least as fast). Outputs under ``--out``:
``official_decode.csv``, ``.json`` (rows and run metadata) and ``.md`` (the table), rewritten after
every point so that a run cut by a timeout keeps what came before. ``--time-budget S`` starts no new
point after S seconds.

    python benchmarks/dev/official_decode.py --official-dir .official/T6 --out $OUT/official-decode \\
        --d-model 2048 --time-budget 150
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import time
import traceback
from pathlib import Path

FILES = {"single": "decode/flashtpa_decode_triton.py", "multi": "decode/flashtpa_decode_triton_multi_kvrank.py"}
VARIANTS = ("b", "bh", "bn")
FIGURE5 = {"d_model": [1024, 2048, 3072], "batch": [1, 2, 4, 8, 16], "lengths": [1 << i for i in range(12, 20)],
           "ranks": ["16,1,1"]}
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
EPS_TOL = 4  # tolerance in epsilons of the dtype, relative to the largest |reference| value
FREE_MARGIN = 0.85  # a point runs when its estimated tensors take less than this share of free memory
IMPLS = ("official", "ours")
TIMED = ("us", "do_bench_us", "host_us", "graph_us", "graph_note")
FIELDS = ["d_model", "heads", "batch", "length", "ranks", "kv_layout", "official_fn", "bytes", "status",
          "ratio", "do_bench_ratio", *(f"{i}_{k}" for i in IMPLS for k in ("err", "error", *TIMED)), "tol"]


# ----------------------------------------------------------------------------------------------
# The official files
# ----------------------------------------------------------------------------------------------


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _lenient_autotune():
    """``triton.autotune`` dropping key names that are not kernel arguments, as Triton's ``run()``
    drops them when it builds each tuning key (Triton 3.9 also refuses them when the kernel is
    defined; the releases the official code was written for did not)."""
    import triton

    real = triton.autotune

    def autotune(configs, key, *args, **kwargs):
        return lambda fn: real(configs, [k for k in key if k in fn.arg_names], *args, **kwargs)(fn)

    triton.autotune = autotune
    try:
        yield
    finally:
        triton.autotune = real


def import_official(path: Path, name: str):
    """One official file, imported unchanged. Returns (module, note): the note says when the file
    needed :func:`_lenient_autotune` (the multi-kvrank file's ``_tpa_decode_reduce`` keys on ``D``,
    not one of its arguments), else it is None. A file that fails with the shim too raises."""
    try:
        return _import_file(path, name), None
    except ValueError as exc:  # Triton 3.9: "key contains names that are not kernel arguments"; 2.x: "'D' is not in list"
        with _lenient_autotune():
            module = _import_file(path, name)
        return module, f"{path.name}: imported with autotune keys outside the kernel's arguments dropped ({exc})"


def load_official(official_dir: Path) -> tuple[dict, list]:
    """Both official decode files: ``({"single": module, "multi": module}, import notes)``."""
    modules, notes = {}, []
    for kind, rel in FILES.items():
        modules[kind], note = import_official(official_dir / rel, f"tpa_bench_official_decode_{kind}")
        notes += [note] if note else []
    return modules, notes


def official_function(modules: dict, ranks: tuple, variant: str):
    """The official function for these ranks: ``(fn, "file:function")``."""
    kind = "single" if ranks[1] == ranks[2] == 1 else "multi"
    name = f"tpa_decode_parallel_{variant}_triton"
    return getattr(modules[kind], name), f"{Path(FILES[kind]).name}:{name}"


# ----------------------------------------------------------------------------------------------
# Inputs and agreement
# ----------------------------------------------------------------------------------------------


def point_inputs(torch, bsz, length, h, d, ranks, dtype, device, kv_layout="planar"):
    """Random factors (N(0, 1)) for one point, in the official layout and as views of the same
    memory in ours (module docstring). Returns ``(theirs, ours)``: ``theirs = (aq, ak, av, bq, bk,
    bv)`` in the official functions' argument order; ``ours = (a_q [B, 1, R_q, H], b_q [B, 1, R_q, D],
    a_k [B, M, R_k, H], b_k [B, M, R_k, D], a_v [B, M, R_v, H], b_v [B, M, R_v, E], cache_seqlens [B])``."""
    r_q, r_k, r_v = ranks
    dims = ((r_k, h), (r_k, d), (r_v, h), (r_v, d))  # a_k, b_k, a_v, b_v; E = D

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    aq, bq = rnd(bsz, 1, h, r_q), rnd(bsz, 1, r_q, d)
    if r_k == r_v == 1:
        flat = [rnd(bsz, length, x) for _, x in dims]  # [B, M, X]
        caches, official = [t.unsqueeze(2) for t in flat], flat
    elif kv_layout == "planar":
        planes = [rnd(bsz, r, length, x) for r, x in dims]  # [B, R, M, X], what the official kernel reads
        caches, official = [p.permute(0, 2, 1, 3) for p in planes], [p.permute(0, 2, 3, 1) for p in planes]
    elif kv_layout == "token":
        caches = [rnd(bsz, length, r, x) for r, x in dims]  # [B, M, R, X], ours contiguous
        official = [c.transpose(2, 3) for c in caches]  # [B, M, X, R]
    else:
        raise ValueError(f"kv_layout must be 'planar' or 'token', got {kv_layout!r}")
    ak, bk, av, bv = official
    seqlens = torch.full((bsz,), length, dtype=torch.int32, device=device)
    return (aq, ak, av, bq, bk, bv), (aq.transpose(2, 3), bq, *caches, seqlens)


def tolerance(torch, dtype) -> float:
    return EPS_TOL * torch.finfo(dtype).eps


def max_errors(torch, outputs: dict, ours: tuple) -> dict:
    """``{name: max |out - ref| / max |ref|}`` over batch rows 0 and B-1 of each output ``[B, 1, H, E]``,
    ``ref`` our reference twin on the inputs ``ours`` upcast to float32 (one row at a time)."""
    from tpa.ops.naive import tpa_decode_reference

    bsz = ours[0].shape[0]
    diffs, top = {name: [] for name in outputs}, 0.0
    for row in sorted({0, bsz - 1}):
        one = [t[row:row + 1] for t in ours]
        ref = tpa_decode_reference(*(t.float() for t in one[:6]), one[6])
        top = max(top, ref.abs().max().item())
        for name, out in outputs.items():
            diffs[name].append((out[row:row + 1].float() - ref).abs().max().item())
    # a NaN anywhere makes the error NaN (max() would drop it)
    worst = {name: float("nan") if any(math.isnan(x) for x in xs) else max(xs) for name, xs in diffs.items()}
    return {name: value / top if top > 0 else value for name, value in worst.items()}


def status_of(row: dict, tol: float) -> str:
    """``ok``, or what went wrong at the point (a failed call, errors above ``tol``)."""
    failed = [i for i in IMPLS if row.get(f"{i}_error")]
    if failed:
        return "FAILED: " + ", ".join(failed)
    bad = [i for i in IMPLS if not row[f"{i}_err"] <= tol]  # NaN counts as bad
    return "MISMATCH: " + ", ".join(bad) if bad else "ok"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class Timing:
    """The timers of the module docstring, applied alike to both implementations (CUDA only)."""

    def __init__(self, torch, reps: int):
        from tpa.bench.timing import Timer

        self.torch, self.reps, self.timer = torch, reps, Timer(torch)

    def measure(self, fn) -> dict:
        """``{us, do_bench_us, host_us, graph_us, graph_note}`` of ``fn``, already warmed up."""
        import triton.testing

        from tpa.bench.timing import eager_host_us, graph_replay

        torch = self.torch
        res = {"us": self.timer.time(fn, reps=self.reps)}
        res["do_bench_us"] = 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100)
        res["host_us"] = eager_host_us(torch, fn)
        res["graph_us"], res["graph_note"] = graph_replay(torch, self.timer, fn, self.reps)
        torch.cuda.synchronize()
        return res


def make_timing(torch, reps: int) -> Timing:
    return Timing(torch, reps)


# ----------------------------------------------------------------------------------------------
# One point, the grid, the results
# ----------------------------------------------------------------------------------------------


def _first_call(fn):
    """``(output, None)`` of the first call (the official one autotunes here), or ``(None, error)``."""
    try:
        return fn(), None
    except Exception as exc:  # a failing implementation is a result of the point
        if type(exc).__name__ == "OutOfMemoryError":  # the point is skipped (_point_row)
            raise
        return None, f"{type(exc).__name__}: {exc}"[:300]


def run_point(torch, args, point: dict, official, timing, device) -> dict:
    """Inputs, agreement and timings of both implementations at one point. Returns its row."""
    from tpa.ops import tpa_decode

    dtype = getattr(torch, DTYPES[args.dtype])
    bsz, h, length, ranks = point["batch"], point["heads"], point["length"], point["rank_tuple"]
    theirs, ours = point_inputs(torch, bsz, length, h, args.head_dim, ranks, dtype, device, args.kv_layout)
    out = torch.empty(bsz, 1, h, args.head_dim, dtype=dtype, device=device)
    fns = {"official": lambda: official(*theirs), "ours": lambda: tpa_decode(*ours, out=out)}
    row = {k: v for k, v in point.items() if k in FIELDS}
    outputs = {}
    for name, fn in fns.items():
        outputs[name], row[f"{name}_error"] = _first_call(fn)
    outputs = {name: o.clone() for name, o in outputs.items() if o is not None}
    row.update({f"{name}_err": err for name, err in max_errors(torch, outputs, ours).items()})
    row["tol"] = tolerance(torch, dtype)
    row["status"] = status_of(row, row["tol"])
    for name in outputs:
        row.update({f"{name}_{k}": v for k, v in timing.measure(fns[name]).items()})
    for key, timed in (("ratio", "us"), ("do_bench_ratio", "do_bench_us")):
        if row.get(f"official_{timed}") and row.get(f"ours_{timed}"):
            row[key] = row[f"official_{timed}"] / row[f"ours_{timed}"]
    return row


def grid_points(args, label_of) -> list[dict]:
    """The points in run order: d_model, batch, length, ranks (as ``tpa bench decode``)."""
    from tpa.bench.decode.inputs import tpa_bytes

    elt = 2  # bf16 and fp16
    points = []
    for d_model in args.d_model:
        h = d_model // args.head_dim
        for bsz in args.batch:
            for length in args.lengths:
                for ranks in args.ranks:
                    points.append({"d_model": d_model, "heads": h, "batch": bsz, "length": length,
                                   "ranks": ",".join(map(str, ranks)), "rank_tuple": ranks,
                                   "kv_layout": args.kv_layout if max(ranks[1:]) > 1 else "",
                                   "official_fn": label_of(ranks),
                                   "bytes": tpa_bytes(bsz, length, h, args.head_dim, ranks, elt)})
    return points


def needed_bytes(point: dict, head_dim: int) -> int:
    """Memory one point takes: the factors (once; the token layout's official call copies them
    again), the official split partials, and the float32 reference of one batch row (its einsum
    over ranks and heads is the largest term)."""
    r_q, r_k, r_v = point["rank_tuple"]
    per_row = point["length"] * (r_q * max(r_k, r_v) * point["heads"] + 4 * (point["heads"] + head_dim)) * 4
    return 2 * point["bytes"] + 2 * per_row


def _fmt(x, digits=1):
    return "" if x is None or x == "" else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


MD_HEAD = ["point (d_model/H, B, L, ranks)", "official us", "ours us", "official/ours", "official do_bench us",
           "ours do_bench us", "official/ours (do_bench)", "official graph us", "ours graph us", "official host us",
           "ours host us", "official max err", "ours max err", "status"]


def _md_row(r: dict) -> list[str]:
    g = r.get
    return [f"{r['d_model']}/{r['heads']}, {r['batch']}, {r['length']}, ({r['ranks']})",
            _fmt(g("official_us")), _fmt(g("ours_us")), _fmt(g("ratio"), 2),
            _fmt(g("official_do_bench_us")), _fmt(g("ours_do_bench_us")), _fmt(g("do_bench_ratio"), 2),
            _fmt(g("official_graph_us")) or "n/a", _fmt(g("ours_graph_us")) or "n/a",
            _fmt(g("official_host_us")), _fmt(g("ours_host_us")), _fmt(g("official_err"), 4), _fmt(g("ours_err"), 4),
            r["status"]]


def _md_notes(rows: list[dict], meta: dict) -> list[str]:
    """One line per distinct graph-capture failure (with its number of points), the import notes."""
    failures = {}
    for r in rows:
        for impl in IMPLS:
            if r.get(f"{impl}_graph_note"):
                failures.setdefault((impl, r[f"{impl}_graph_note"]), []).append(r)
    lines = [f"- {impl}: no graph replay at {len(rs)} point(s), the capture failed: {note}"
             for (impl, note), rs in failures.items()]
    return lines + [f"- {note}" for note in meta.get("import_notes", [])]


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table: per point both implementations' times, ratios, errors and the status."""
    from tpa.utils.tables import markdown_table

    device = meta.get("device_name", meta["device"])
    budget = " (stopped at the time budget)" if meta.get("stopped_at_budget") else ""
    intro = (f"Command: `{' '.join(meta['argv'])}`. Official: {', '.join(meta['official_functions'])}; dtype "
             f"{meta['dtype']}, d_h {meta['head_dim']}, caches for R_k, R_v > 1 stored {meta['kv_layout']}. us: CUDA "
             "events, L2 flushed, host work hidden; do_bench: triton.testing.do_bench's mean; graph: one replayed "
             "call; host: one eager call's host time. Ratios are official / ours (>= 1: ours at least as fast). "
             "Errors: max |out - ref| / max |ref| against our float32 reference twin, batch rows 0 and B-1.")
    lines = [f"# Official FlashTPA decode beside ours ({meta['date']}, {device})", "", intro, "",
             f"{meta['points_done']} of {meta['points_total']} points{budget}.", "",
             markdown_table(MD_HEAD, [_md_row(r) for r in rows], "l" + "r" * 12 + "l")]
    return "\n".join(lines + _md_notes(rows, meta)) + "\n"


def write_results(out_dir: Path, rows: list[dict], meta: dict) -> None:
    """``official_decode.csv``, ``.json`` and ``.md``, each written atomically."""
    from tpa.utils.files import atomic_write_csv, atomic_write_json, atomic_write_text

    atomic_write_csv(out_dir / "official_decode.csv", rows, FIELDS)
    atomic_write_json(out_dir / "official_decode.json", {**meta, "fields": FIELDS, "rows": rows})
    atomic_write_text(out_dir / "official_decode.md", markdown(rows, meta))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _ranks(text: str) -> tuple[int, int, int]:
    try:
        ranks = tuple(int(x) for x in text.split(","))
    except ValueError:
        ranks = ()
    if len(ranks) != 3 or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be R_q,R_k,R_v (three integers >= 1), got {text!r}")
    return ranks


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-dir", type=Path, required=True, help="a checkout of tensorgi/T6")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")) / "official_decode")
    p.add_argument("--d-model", type=_positive, nargs="+", default=FIGURE5["d_model"])
    p.add_argument("--head-dim", type=_positive, default=64)
    p.add_argument("--batch", type=_positive, nargs="+", default=FIGURE5["batch"])
    p.add_argument("--lengths", type=_positive, nargs="+", default=FIGURE5["lengths"])
    p.add_argument("--ranks", type=_ranks, nargs="+", default=[_ranks(r) for r in FIGURE5["ranks"]],
                   help="R_q,R_k,R_v per rank set (default 16,1,1, the paper's)")
    p.add_argument("--variant", choices=VARIANTS, default="bn", help="the official tpa_decode_parallel_* (default bn)")
    p.add_argument("--kv-layout", choices=["planar", "token"], default="planar",
                   help="cache storage where R_k or R_v > 1 (module docstring)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--reps", type=_positive, default=20, help="timed calls per point of the CUDA-event timer")
    p.add_argument("--time-budget", type=float, default=None, help="start no new point after this many seconds")
    args = p.parse_args(argv)
    for d_model in args.d_model:
        if d_model % args.head_dim:
            p.error(f"--d-model {d_model} is not a multiple of --head-dim {args.head_dim}")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    missing = [str(args.official_dir / rel) for rel in FILES.values() if not (args.official_dir / rel).is_file()]
    if missing:
        p.error(f"--official-dir must be a checkout of tensorgi/T6; not found: {', '.join(missing)}")
    return args


def _log(row: dict) -> None:
    times = "  ".join(f"{i} {row[f'{i}_us']:.1f} us" for i in IMPLS if row.get(f"{i}_us") is not None)
    ratio = f"  official/ours {row['ratio']:.2f}" if row.get("ratio") else ""
    print(f"d_model {row['d_model']} B={row['batch']} L={row['length']} R=({row['ranks']}): {times}{ratio}  "
          f"[{row['status']}]", flush=True)


def main(argv=None, device: str = "cuda") -> int:
    """Run the grid; returns 0, 1 when a point failed or mismatched, 2 without CUDA."""
    args = parse_args(argv)
    import torch

    from tpa.utils.runinfo import run_metadata

    if device == "cuda" and not torch.cuda.is_available():
        print("official_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    modules, notes = load_official(args.official_dir)
    timing = make_timing(torch, args.reps)
    points = grid_points(args, lambda ranks: official_function(modules, ranks, args.variant)[1])
    command = ["benchmarks/dev/official_decode.py", *(argv if argv is not None else sys.argv[1:])]
    meta = {**run_metadata(torch.device(device), command),
            "official_dir": str(args.official_dir), "official_functions": sorted({p["official_fn"] for p in points}),
            "import_notes": notes, "dtype": args.dtype, "head_dim": args.head_dim, "kv_layout": args.kv_layout,
            "points_total": len(points), "points_done": 0, "stopped_at_budget": False}
    rows, t0 = [], time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for point in points:
        if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
            meta["stopped_at_budget"] = True
            break
        rows.append(_point_row(torch, args, point, modules, timing, device))
        meta["points_done"] = len(rows)
        write_results(args.out, rows, meta)
        _log(rows[-1])
    write_results(args.out, rows, meta)
    print(f"wrote {args.out / 'official_decode.md'} (.csv, .json)")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


def _point_row(torch, args, point, modules, timing, device) -> dict:
    """:func:`run_point`; a ``skipped`` row where the point does not fit in free memory or runs out of
    it, a ``FAILED`` one (with the error; the traceback printed) where anything else raised."""
    skipped = {k: v for k, v in point.items() if k in FIELDS}
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if needed_bytes(point, args.head_dim) > FREE_MARGIN * free:
            return {**skipped, "status": "skipped: does not fit"}
    official = official_function(modules, point["rank_tuple"], args.variant)[0]
    try:
        return run_point(torch, args, point, official, timing, device)
    except torch.cuda.OutOfMemoryError:
        return {**skipped, "status": "skipped: out of memory"}
    except Exception as exc:  # noqa: BLE001  # a timer or the check failed: keep the grid going
        traceback.print_exc()
        return {**skipped, "status": f"FAILED: {type(exc).__name__}: {exc}"[:300]}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
