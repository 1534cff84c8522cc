"""Host-side Python cost of one eager ``tpa_decode`` call, on the CPU, with the kernel launches stubbed out.

This measures only what runs in Python before the launches (key lookup, validation, launch
parameters, allocation of the output): the launches themselves are replaced by no-ops, so the
number is neither a GPU time nor the host time of a real launch (``tpa bench decode`` measures that
on a GPU, as ``host_us``). It is useful to compare host-side changes on any machine.

    PYTHONPATH=. python scripts/decode_host_cost.py --handles --out   # this tree, as `tpa bench decode` calls
    PYTHONPATH=/path/to/other/tree python scripts/decode_host_cost.py --legacy   # a tree before the plan cache

``--handles`` stubs a compiled handle into each plan (what a GPU call launches through after its
first), ``--out`` passes a preallocated output (as ``tpa bench decode`` does). The stubs take the
same arguments as the real launchers, so the Python before them is measured, not the launchers'
own work (on a GPU, Triton's launcher also reads every pointer argument it is given as a tensor).

Prints one line per point: mean microseconds per call over ``--calls`` calls (best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU path of backend="triton"; launches are stubbed anyway

import torch  # noqa: E402


class _StubKernel:
    """Stands for a ``triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


class _StubHandle:
    """Stands for a compiled kernel: ``run(...)`` does nothing."""

    function = None
    packed_metadata = None

    @staticmethod
    def run(*args):
        return None


def _stub(legacy: bool) -> None:
    stubs = (_StubKernel(), _StubKernel())
    if legacy:
        from tpa.ops import decode

        decode._kernels = lambda: stubs
        decode.triton_interpreter_active = lambda: True
        return
    from tpa.ops import decode_launch

    decode_launch._kernels = lambda: stubs


def _inputs(bsz, length, heads, d, ranks, paged, dtype=torch.bfloat16):
    r_q, r_k, r_v = ranks
    a_q, b_q = torch.randn(bsz, 1, r_q, heads, dtype=dtype), torch.randn(bsz, 1, r_q, d, dtype=dtype)
    lens = torch.full((bsz,), length, dtype=torch.int32)
    if paged:
        page = 64
        blocks = bsz * (length // page)
        caches = [torch.randn(blocks, page, r, x, dtype=dtype) for r, x in ((r_k, heads), (r_k, d), (r_v, heads), (r_v, d))]
        table = torch.arange(blocks, dtype=torch.int32).reshape(bsz, -1)
        return (a_q, b_q, *caches, lens, table)
    caches = [torch.randn(bsz, length, r, x, dtype=dtype) for r, x in ((r_k, heads), (r_k, d), (r_v, heads), (r_v, d))]
    return (a_q, b_q, *caches, lens, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--legacy", action="store_true", help="the tree has no plan cache (tpa.ops.decode._kernels)")
    p.add_argument("--handles", action="store_true",
                   help="also stub a compiled handle into each plan (the GPU path after the first call)")
    p.add_argument("--out", action="store_true", help="pass a preallocated out= (as tpa bench decode does)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    _stub(args.legacy)
    from tpa.ops import tpa_decode

    points = [(1, 4096, 32, 64, (16, 1, 1), False), (8, 4096, 32, 64, (6, 2, 2), False),
              (1, 4096, 34, 64, (3, 2, 1), True), (16, 1024, 78, 64, (16, 2, 2), False)]
    for bsz, length, heads, d, ranks, paged in points:
        inputs = _inputs(bsz, length, heads, d, ranks, paged)
        kwargs = dict(block_table=inputs[7], backend="triton", check_lengths=False)
        if args.out:
            kwargs["out"] = torch.empty(bsz, 1, heads, d, dtype=inputs[0].dtype)
        tpa_decode(*inputs[:7], **kwargs)
        if args.handles and not args.legacy:
            from tpa.ops import decode_launch

            for entry in decode_launch.PLANS.values():
                plan = entry.plan
                if plan is not None:
                    plan.split_handle = plan.merge_handle = _StubHandle()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                tpa_decode(*inputs[:7], **kwargs)
            best = min(best, (time.perf_counter() - t0) / args.calls)
        print(f"B={bsz} L={length} H={heads} D={d} ranks={ranks} paged={paged}: {best * 1e6:.1f} us per call "
              f"(CPU, launches stubbed{', out=' if args.out else ''})")


if __name__ == "__main__":
    main()
