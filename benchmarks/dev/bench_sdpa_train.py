"""Training-shape attention on one GPU: SDPA forward + backward per backend and input layout.

For the ``small`` preset's attention (sequence 1024, micro-batch 16, d_h 64, causal, bf16) with
TPA's 34 heads and MHA's 12, times ``F.scaled_dot_product_attention`` forward and forward+backward
with each backend (cuDNN, flash, memory-efficient, and PyTorch's default choice), for queries,
keys and values given as ``[B, T, H, D]`` tensors transposed to ``[B, H, T, D]`` (what the layers
pass) and as contiguous ``[B, H, T, D]``. CUDA events, median of 20 after warm-up. Writes
``sdpa_train.json`` under ``--out``.

    python benchmarks/dev/bench_sdpa_train.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.nn.functional as F

from tpa.bench.timing import median_ms as time_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench_sdpa_train"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for heads in (34, 12):
        flops_fwd = 4 * args.batch * heads * args.seq * args.seq * 64 / 2  # causal half
        for layout in ("bthd", "bhtd"):
            shape = (args.batch, args.seq, heads, 64) if layout == "bthd" else (args.batch, heads, args.seq, 64)
            q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            grad = torch.randn(args.batch, heads, args.seq, 64, device="cuda", dtype=torch.bfloat16)

            def views():
                return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if layout == "bthd" else (q, k, v)

            for name, backend in BACKENDS.items():
                def call():
                    qh, kh, vh = views()
                    if backend is None:
                        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)

                def fwd_bwd():
                    out = call()
                    out.backward(grad)

                row = {"heads": heads, "layout": layout, "backend": name}
                try:
                    with torch.no_grad():
                        row["fwd_ms"] = time_ms(call)
                    row["fwd_bwd_ms"] = time_ms(fwd_bwd)
                    row["fwd_tflops"] = flops_fwd / row["fwd_ms"] / 1e9
                    row["fwd_bwd_tflops"] = 3.5 * flops_fwd / row["fwd_bwd_ms"] / 1e9
                except Exception as err:  # noqa: BLE001  # a backend that does not take these inputs
                    row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    if not isinstance(err, RuntimeError):
                        traceback.print_exc()
                results.append(row)
                print(json.dumps(row), flush=True)
            del q, k, v, grad
    with open(os.path.join(args.out, "sdpa_train.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
