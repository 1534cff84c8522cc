"""``tpa bench decode``: the FlashTPA decoding kernel against the reference twin and PyTorch SDPA.

One run, on one CUDA GPU:

1. measures the device-to-device copy bandwidth (bytes read + written, the ceiling for a
   memory-bound kernel);
2. checks the kernel against float64 on the GPU (dtypes, odd head counts and dims, ranks, paged
   caches, N > 1) and that a CUDA graph captured at one cache length replays correctly at others;
3. sweeps the paper's Figure 5 grid: batch {1, 2, 4, 8, 16} x d_model {1024, 2048, 3072} (d_h = 64)
   x cache length 2^12 .. 2^19 x TPA ranks (16, 1, 1) and (6, 2, 2), skipping what does not fit,
   timing with CUDA events and the L2 cache flushed before every call: this kernel, the reference
   twin (small points), and SDPA decoding over materialised K/V caches for MHA, GQA with 4 KV heads
   and MQA at the same H and d_h;
4. times batch 1 / length 4096 with plain launches and with CUDA-graph replay;
5. times consecutive decode steps with the cache length growing by one per step.

It writes ``decode.csv``, ``decode_dmodel{D}.png`` (log2 time against log2 length, one panel per
batch, like the paper's Figure 5), ``latency.json``, ``growing.csv`` and ``summary.txt`` under
``--out``, and prints per point microseconds, GB/s and the fraction of the copy bandwidth.
With ``--tune`` it first chooses the launch heuristic's constants by measurement (see ``tune``).
Restrict the grid with ``--batch``, ``--d-model``, ``--min-len``/``--max-len``, ``--ranks`` and
``--baselines`` so that a run fits a time budget.
"""


from __future__ import annotations

import argparse

DEFAULT_RANKS = ["16,1,1", "6,2,2"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "decode",
        help="FlashTPA decoding kernel vs reference twin vs SDPA (MHA/GQA/MQA), Figure 5 grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--d-model", type=int, nargs="+", default=[1024, 2048, 3072])
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min-len", type=int, default=1 << 12, help="smallest cache length (power of two)")
    p.add_argument("--max-len", type=int, default=1 << 19, help="largest cache length (power of two)")
    p.add_argument("--ranks", nargs="+", default=DEFAULT_RANKS, help="TPA ranks as R_q,R_k,R_v")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--baselines", nargs="*", default=["mha", "gqa4", "mqa"], help="SDPA baselines (mha gqa4 mqa)")
    p.add_argument("--reference-max-len", type=int, default=1 << 13, help="time the twin up to this length")
    p.add_argument("--reps", type=int, default=20, help="timed calls per point (fewer for slow points)")
    p.add_argument("--growing-steps", type=int, default=256)
    p.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--tune", action="store_true",
                   help="first choose the launch heuristic's constants by measurement (used for the rest of the run)")
    p.add_argument("--sweep", action="store_true",
                   help="only sweep explicit launch configurations (splits, stages, block, warps, PDL) at "
                        "the target points and write sweep.csv; no grid")
    p.add_argument("--flush", choices=["read", "write"], default="read",
                   help="how the L2 cache is flushed before each timed call: by reading a buffer of 4x L2 (leaves "
                        "clean lines) or by rewriting it (leaves ~L2-size of dirty lines the timed call must write "
                        "back)")
    p.add_argument("--out", default="runs/bench_decode", help="output directory")
    p.set_defaults(func=main)


def main(args) -> int:
    from tpa.bench.decode.run import main as run_main

    return run_main(args)
