"""Pieces of a static decode step of the ``small`` preset, each with and without its fused launch, in
CUDA-graph replay:

- the TPA factor projection (768 -> 980 outputs) as ``F.linear``: its cuBLAS kernel at each batch;
- a residual add and the RMSNorm after it as two torch ops and as one launch (``tpa.ops.add_norm``);
- SwiGLU's activation ``silu(gate) * up`` of the fused ``[B, 1, 2 * 2048]`` projection as two torch ops
  and as one launch (``tpa.ops.swiglu``).

Each variant is captured as 12 calls (one per layer of ``small``, each on its own weights) and
replayed with the L2 flushed before every replay; the table gives GPU microseconds per call (replay
time / 12) and the kernels each variant launches (torch.profiler, eager calls).

    python benchmarks/dev/step_kernels.py --batch 1 8 --out $OUT/step-kernels
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tpa.bench.timing import Timer, graph_replay, kernel_times
from tpa.ops.add_norm import add_rms_norm, add_rms_norm_reference
from tpa.ops.swiglu import silu_mul, silu_mul_reference
from tpa.utils.files import atomic_write_json, atomic_write_text
from tpa.utils.runinfo import run_metadata

LAYERS = 12


def _variants(batch: int, hidden: int, width: int, inner: int, dtype):
    dev = "cuda"
    x = torch.randn(batch, 1, hidden, device=dev, dtype=dtype)
    weights = [torch.randn(width, hidden, device=dev, dtype=dtype) * 0.02 for _ in range(LAYERS)]
    deltas = [torch.randn(batch, 1, hidden, device=dev, dtype=dtype) for _ in range(LAYERS)]
    gains = [torch.rand(hidden, device=dev, dtype=dtype) + 0.5 for _ in range(LAYERS)]
    gate_ups = [torch.randn(batch, 1, 2 * inner, device=dev, dtype=dtype) for _ in range(LAYERS)]
    return {
        "projection F.linear": lambda: [F.linear(x, w) for w in weights],
        "silu(gate) * up (torch)": lambda: [silu_mul_reference(g) for g in gate_ups],
        "silu_mul (one launch)": lambda: [silu_mul(g, backend="triton") for g in gate_ups],
        "add + rms_norm (torch)": lambda: [add_rms_norm_reference(x, d, g, 1e-6) for d, g in zip(deltas, gains)],
        "add_rms_norm (one launch)": lambda: [add_rms_norm(x, d, g, 1e-6, backend="triton")
                                              for d, g in zip(deltas, gains)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--width", type=int, default=980, help="projection outputs (small TPA: 980)")
    parser.add_argument("--inner", type=int, default=2048, help="SwiGLU width (small: 2048)")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/step_kernels"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(torch)
    rows = []
    with torch.no_grad():
        for batch in args.batch:
            for name, fn in _variants(batch, args.hidden, args.width, args.inner, torch.bfloat16).items():
                fn()
                torch.cuda.synchronize()
                us, why = graph_replay(torch, timer, fn, args.reps)
                kernels = kernel_times(torch, fn)
                rows.append({"batch": batch, "variant": name, "us_per_call": None if us is None else us / LAYERS,
                             "capture_error": why,
                             "kernels": {k: round(v / LAYERS, 2) for k, v in kernels.items()}})
                print(rows[-1], flush=True)
    atomic_write_json(out / "step_kernels.json", {"meta": run_metadata(torch.device("cuda")), "rows": rows})
    lines = ["| B | variant | GPU us per call (graph replay) | kernels (us per call) |", "| ---: | :--- | ---: | :--- |"]
    for r in rows:
        us = "failed" if r["us_per_call"] is None else f"{r['us_per_call']:.2f}"
        lines.append(f"| {r['batch']} | {r['variant']} | {us} | "
                     + "; ".join(f"`{k}` {v}" for k, v in r["kernels"].items()) + " |")
    atomic_write_text(out / "step_kernels.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
