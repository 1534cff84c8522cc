"""Where a `generate()` decode step goes: `tpa bench generate`'s protocol (static cache, CUDA-graph
decoding, a prompt prefilled in chunks), with the decode steps of one call under torch.profiler.

For each type and batch it prints the wall time per step, the GPU busy time per step (the sum of the
kernels' times over the steps), the top kernels with their share of the GPU time, and the host-side
calls that stall or launch (synchronisations, device-to-host copies, graph launches) per step. The
difference between wall and GPU time is what `generate()`'s Python and the host syncs add.

    python benchmarks/dev/profile_generate.py --types tpa gqa llama --context 32768 --batch 1 8 --out $OUT/profile
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tpa import T6Config
from tpa.bench.generate import _generate_once, _model_and_caches
from tpa.bench.hf_llama import LLAMA_TYPE, llama_config_like
from tpa.models.t6.hf_compat import cache_kwargs

HOST_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaGraphLaunch",
              "cudaLaunchKernel", "cuLaunchKernelEx", "cudaEventSynchronize")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_point(kind: str, batch: int, context: int, steps: int, top: int, device) -> dict:
    cfg = (llama_config_like(T6Config.from_preset("small", "gqa", max_position_embeddings=context + 4 * steps))
           if kind == LLAMA_TYPE else T6Config.from_preset("small", kind, max_position_embeddings=context + 4 * steps))
    dtype, graphs = (torch.bfloat16, True) if device.type == "cuda" else (torch.float32, False)
    model, new_cache, _ = _model_and_caches(kind, cfg, device, dtype, batch, context + 2 * steps, graphs)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
    mask = torch.ones_like(ids)
    _generate_once(model, ids[:, :64], mask[:, :64], 2, 2048, device, new_cache())  # capture / compile
    _generate_once(model, ids, mask, steps, 2048, device, new_cache())  # warm at this length
    cache = new_cache()
    kwargs = cache_kwargs(cache)
    with torch.no_grad():
        for piece in ids[:, :-1].split(2048, dim=1):
            model(input_ids=piece, **kwargs, use_cache=True, logits_to_keep=1)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, **kwargs, max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, pad_token_id=0)
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)
    gpu_us = sum(e.self_device_time_total for e in kernels) or float("nan")
    host = {e.key: e.count for e in events if e.key in HOST_CALLS}
    row = {"type": kind, "batch": batch, "context": context, "steps": steps,
           "wall_ms_per_step": 1e3 * wall / steps, "gpu_busy_ms_per_step": gpu_us / 1e3 / steps,
           "host_calls_per_step": {k: v / steps for k, v in host.items()},
           "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                            "share": e.self_device_time_total / gpu_us, "calls_per_step": e.count / steps}
                           for e in kernels[:top]]}
    del model, cache
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["tpa", "gqa", LLAMA_TYPE])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=24, help="decode steps of the profiled generate call")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--device", default="cuda", help="cpu checks the script (no graphs, no GPU times)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/profile_generate")))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.types:
        for batch in args.batch:
            row = _profile_point(kind, batch, args.context, args.steps, args.top, torch.device(args.device))
            rows.append(row)
            print(f"\n{kind} B={batch} L={args.context}: wall {row['wall_ms_per_step']:.3f} ms/step, GPU busy "
                  f"{row['gpu_busy_ms_per_step']:.3f} ms/step; host calls/step "
                  + ", ".join(f"{k} {v:.1f}" for k, v in row["host_calls_per_step"].items()), flush=True)
            for k in row["top_kernels"]:
                print(f"   {k['ms_per_step']:8.3f} ms {k['share']:6.1%} x{k['calls_per_step']:5.1f}  {k['name']}")
            (args.out / "profile_generate.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
