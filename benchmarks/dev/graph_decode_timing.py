"""How fast a T6 decode step gets with CUDA graphs (that graph decoding gives the eager results is
tested: ``python -m pytest -m gpu tests/models``).

Timing (bfloat16, batch 1, a 4K context prefilled in chunks of 1,024 tokens, types tpa,
mha, gqa, mla): milliseconds per decode step for the dynamic eager path, the static eager path and
CUDA graphs, (a) by a loop of direct forward calls feeding back the argmax without host syncs (4
untimed steps, then 32 timed; the graph is captured in the untimed ones) and (b) by
``model.generate`` of 32 tokens after the prefilled cache (a warm-up generate on the same cache
first, so the graph capture is not timed), time divided by 32.

Every case runs in its own try/except; a failure is recorded with its traceback and the run goes
on. Results are written after every case to ``OUT/graph_decode_timing.json`` and ``.txt`` (``OUT``:
``--out``, default ``$OUT``, else ``runs/gpu_graph_decode_timing``). Exit status 1 when a case
raised. Without CUDA (``--device cpu``, a smoke run of the plumbing) the graph columns are skipped.

Usage: python benchmarks/dev/graph_decode_timing.py [--out DIR] [--time-budget 170]
       python benchmarks/dev/graph_decode_timing.py --device cpu --preset tiny --context 128 (smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from tpa import T6Cache, T6Config, T6ForCausalLM
from tpa.utils.files import atomic_write_json, atomic_write_text
from tpa.utils.runinfo import run_metadata
from tpa.models.t6.hf_compat import cache_kwargs

TIMED_TYPES = ("tpa", "mha", "gqa", "mla")
MODES = ("dynamic", "static", "graphs")


def build(attention_type: str, preset: str, device, dtype, max_positions: int) -> T6ForCausalLM:
    cfg = T6Config.from_preset(preset, attention_type, initializer_range=0.1, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    with torch.device(device):
        model = T6ForCausalLM(cfg)
    return model.to(dtype).eval()


def new_cache(model, batch: int, capacity: int, mode: str):
    """A dynamic cache, or a static one whose one-token steps replay a CUDA graph (``graphs``) or run
    eagerly (``static``)."""
    if mode == "dynamic":
        return T6Cache.for_model(model, batch, capacity=capacity)
    return T6Cache.for_model(model, batch, capacity=capacity, static=True, cuda_graphs=mode == "graphs")


def _prefill(model, cache, ids, chunk: int = 1024):
    with torch.no_grad():
        out = None
        for piece in ids.split(chunk, dim=1):
            out = model(piece, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_ms_per_step(model, mode: str, context: int, batch: int, device, warmup: int = 4, steps: int = 32):
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    cache = new_cache(model, batch, context + warmup + steps + 1, mode)
    tok = _prefill(model, cache, ids)
    with torch.no_grad():
        for _ in range(warmup):
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
    return 1e3 * (time.perf_counter() - start) / steps


def generate_ms_per_token(model, mode: str, context: int, batch: int, device, new_tokens: int = 32):
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    cache = new_cache(model, batch, context + new_tokens, mode)
    kw = dict(do_sample=False, pad_token_id=0)
    for n in (2, new_tokens):  # a warm-up generation on the same cache (captures the graph), then the timed one
        cache.reset()
        _prefill(model, cache, ids[:, :-1])
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), max_new_tokens=n,
                                 min_new_tokens=n, **kw)
        _sync(device)
        elapsed = time.perf_counter() - start
    if out.shape[1] != context + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - context} tokens, expected {new_tokens}")
    return 1e3 * elapsed / new_tokens


def render(record: dict) -> str:
    lines = [f"CUDA-graph decode check: {record['run'].get('device_name')}, {record['run'].get('date')}, "
             f"preset {record['preset']}, torch {torch.__version__}", "",
             ]
    lines += ["", f"Decode step time, batch {record['timing_batch']}, context {record['context']:,}, "
                  f"{record['timing_dtype']} (ms per step):",
              f"  {'type':5s} {'mode':8s} {'forward loop':>13s} {'generate':>10s}  status"]
    for r in record["timings"]:
        f = "" if r.get("forward_ms") is None else f"{r['forward_ms']:.3f}"
        g = "" if r.get("generate_ms") is None else f"{r['generate_ms']:.3f}"
        lines.append(f"  {r['attention_type']:5s} {r['mode']:8s} {f:>13s} {g:>10s}  {r['status'].splitlines()[0]}")
    lines += ["", f"cases that raised: {record['failures']}; {record['seconds']:.1f} s", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_graph_decode_timing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="small")
    p.add_argument("--timed-types", nargs="+", default=list(TIMED_TYPES))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--time-budget", type=float, default=170.0, help="seconds; later cases are skipped")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("needs CUDA (or --device cpu for a smoke run without graphs)", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    start = time.perf_counter()
    timing_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    record = {"preset": args.preset, "context": args.context, "timing_batch": args.batch,
              "timing_dtype": str(timing_dtype).replace("torch.", ""),
              "timings": [], "failures": 0, "seconds": 0.0,
              "run": run_metadata(device)}

    def save():
        record["seconds"] = time.perf_counter() - start
        record["failures"] = sum(not r["status"].startswith(("ok", "skipped")) for r in record["timings"])
        atomic_write_json(out_dir / "graph_decode_timing.json", record)
        text = render(record)
        atomic_write_text(out_dir / "graph_decode_timing.txt", text)
        return text

    def over_budget() -> bool:
        return time.perf_counter() - start > args.time_budget

    for attention_type in args.timed_types:
        model = None
        try:
            model = build(attention_type, args.preset, device, timing_dtype, args.context + 256)
        except Exception as err:  # noqa: BLE001
            record["timings"].append({"attention_type": attention_type, "mode": "build",
                                      "status": f"error: {type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()})
            save()
            continue
        for mode in MODES:
            row = {"attention_type": attention_type, "mode": mode, "status": "ok"}
            if mode == "graphs" and not cuda:
                row["status"] = "skipped (no CUDA)"
            elif over_budget():
                row["status"] = "skipped (time budget)"
            else:
                try:
                    row["forward_ms"] = forward_ms_per_step(model, mode, args.context, args.batch, device)
                    row["generate_ms"] = generate_ms_per_token(model, mode, args.context, args.batch, device)
                except Exception as err:  # noqa: BLE001
                    row.update(status=f"error: {type(err).__name__}: {err}", traceback=traceback.format_exc())
            record["timings"].append(row)
            print(f"timing {attention_type} {mode}: forward {row.get('forward_ms')} ms/step, generate "
                  f"{row.get('generate_ms')} ms/token, {row['status'].splitlines()[0]}", flush=True)
            save()
        del model
        if cuda:
            torch.cuda.empty_cache()

    print(save())
    print(f"wrote {out_dir / 'graph_decode_timing.json'} and {out_dir / 'graph_decode_timing.txt'}")
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
