"""The FlashTPA split kernel compiled for a GPU on a machine without one: its loads by width,
registers, spilled bytes and shared memory, per launch configuration (no timing).

Triton compiles to PTX and a cubin for a given target without a device. This builds the launch
plan that ``tpa_decode`` would build (:class:`tpa.ops.decode_launch.DecodePlan`, on ``meta`` tensors
with the requested shapes and strides), specialises the arguments as ``triton.jit`` would on a GPU
(integers equal to 1 become constants, integers divisible by 16 get the divisibility hint, pointers
are 16-byte aligned) and compiles the split kernel for sm_90. It is how the unaligned head-factor
loads at H = 34 were found (BENCHMARKS.md, "the head-factor rows aligned": 136 16-bit loads per
thread per block before the ``A_ALIGN`` hint). Register counts depend on the Triton version: those
of this machine's Triton are not the device's.

    python benchmarks/dev/decode_ptx.py                        # the small preset's decode shapes
    python benchmarks/dev/decode_ptx.py --batch 8 --heads 34 --ranks 6,2,2 --a-heads 34 40 48 --block-m 32 64
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch

from tpa.bench.decode.inputs import tpa_inputs
from tpa.ops import decode_launch
from tpa.ops.decode import DecodeConfig, DecodeLaunchOptions, default_config

_POINTER_TYPES = {"SEQLENS": "*i32", "BLOCK_TABLE": "*i32", "LSE": "*fp32", "O_PART": "*fp32", "LSE_PART": "*fp32",
                  "TIMES": "*i64"}
_TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_UNSPECIALISED = ("N", "capacity", "num_splits")  # the kernel's do_not_specialize


def compile_split(plan, dtype, sm: int = 90, max_registers: int | None = None):
    """The compiled split kernel of ``plan`` for ``sm`` (a ``triton.compiler.CompiledKernel``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = decode_launch._kernels()[0]
    names = kernel.arg_names
    n_ptr = names.index("N")  # the pointers come first
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(names[:n_ptr]):
        signature[name] = _POINTER_TYPES.get(name, _TRITON_TYPES[dtype])
        attrs[(i,)] = [["tt.divisibility", 16]]
    for i, (name, value) in enumerate(zip(names[n_ptr:], plan.split_scalars), start=n_ptr):
        if isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in _UNSPECIALISED:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and name not in _UNSPECIALISED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    # what a GPU plan would hold: tensor-core dots for 16-bit caches, no interpreter fix-ups
    gpu = dict(plan.split_constexprs, IEEE_DOT=dtype == torch.float32, FIX_BF16=False)
    for name, value in gpu.items():
        signature[name], constants[name] = "constexpr", value
    options = dict(plan.split_options)
    options.pop("maxnreg", None)
    if max_registers is not None:
        options["maxnreg"] = max_registers
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", sm, 32),
                          options=options)


def resources(compiled) -> dict:
    """Registers, spilled stack bytes, shared memory and the PTX's global loads by width."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ptx = compiled.asm["ptx"]
    return {"registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "shared": compiled.metadata.shared, "loads": dict(Counter(re.findall(r"ld\.global[\w.]*", ptx))),
            "cp_async": len(re.findall(r"cp\.async\.[\w.]*", ptx))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=34)
    p.add_argument("--ranks", default="6,2,2")
    p.add_argument("--a-heads", type=int, nargs="+", default=[34, 40, 48],
                   help="heads per A-cache row (>= --heads: padded rows, read with a_head_pad)")
    p.add_argument("--block-m", type=int, nargs="+", default=[None], help="DecodeConfig.block_m (default: heuristic)")
    p.add_argument("--stages", type=int, nargs="+", default=[None], help="DecodeConfig.num_stages")
    p.add_argument("--max-registers", type=int, nargs="+", default=[None])
    p.add_argument("--sm", type=int, default=90)
    p.add_argument("--a-loads", action="store_true",
                   help="DecodeLaunchOptions(a_dot=False): the head factors by plain loads (default: through tl.dot)")
    args = p.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "0")
    ranks = tuple(int(r) for r in args.ranks.split(","))
    h, dtype = args.heads, torch.bfloat16
    for bsz in args.batch:
        for a_heads in args.a_heads:
            options = DecodeLaunchOptions(a_head_pad=_pad_for(h, a_heads), a_dot=not args.a_loads)
            inputs = tpa_inputs(torch, bsz, args.length, h, 64, ranks, dtype, capacity=args.length + 64,
                                a_heads=a_heads, device="meta")
            for block_m in args.block_m:
                for stages in args.stages:
                    for cap in args.max_registers:
                        fixed = DecodeConfig(block_m=block_m, num_stages=stages)
                        cfg = default_config(bsz, 1, h, 64, 64, args.length + 64, 132, 2, fixed, ranks[1], ranks[2])
                        plan = decode_launch.DecodePlan(*inputs[:6], None, 0.125, False, cfg, options)
                        res = resources(compile_split(plan, dtype, args.sm, cap))
                        print(f"B={bsz} H={h} A heads={a_heads} ranks={ranks} block_m={cfg.block_m} "
                              f"stages={cfg.num_stages} warps={cfg.num_warps} splits={cfg.num_splits} "
                              f"A_ALIGN={plan.split_constexprs['A_ALIGN']} max_registers={cap}: {res}", flush=True)


def _pad_for(h: int, a_heads: int) -> int:
    """The ``a_head_pad`` whose padded width is ``a_heads`` (1: unpadded)."""
    if a_heads == h:
        return 1
    for pad in (8, 16, 32, 64):
        if -(-h // pad) * pad == a_heads:
            return pad
    raise SystemExit(f"--a-heads {a_heads} is no multiple-of-8/16/32/64 padding of {h} heads")


if __name__ == "__main__":
    main()
