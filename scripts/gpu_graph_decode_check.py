"""CUDA-graph decoding of T6 models: it gives the eager results, and how fast a decode step gets.

Part 1, checks (float32 and bfloat16, every attention type, the ``small`` preset with random
weights of init std 0.1 so that greedy choices are well separated, a left-padded batch of three
short prompts of 5, 16 and 11 tokens, 16 greedy new tokens):

- ``graphs == static eager``: decoding with a static cache whose one-token steps replay a captured
  CUDA graph equals the same static steps run eagerly (``cuda_graphs=False``): the same tokens and
  bitwise the same scores (the replay launches the eager step's kernels). Required.
- ``graphs == dynamic``: against the default dynamic cache (attention over ``max(seqlens)`` slots,
  other kernels): the same tokens in float32 (required). In bfloat16 a divergence is accepted only
  at a near tie: at the first differing step, the dynamic run's score gap between its token and the
  graph run's token is at most twice the largest score difference of the two runs at that step.
- ``sync-free``: one static eager step runs under ``torch.cuda.set_sync_debug_mode("error")``
  (any implicit host sync raises). Required.
- the graph was captured once and replayed for every decode step.

Part 2, timing (bfloat16, batch 1, a 4K context prefilled in chunks of 1,024 tokens, types tpa,
mha, gqa, mla): milliseconds per decode step for the dynamic eager path, the static eager path and
CUDA graphs, (a) by a loop of direct forward calls feeding back the argmax without host syncs (4
untimed steps, then 32 timed; the graph is captured in the untimed ones) and (b) by
``model.generate`` of 32 tokens after the prefilled cache (a warm-up generate on the same cache
first, so the graph capture is not timed), time divided by 32.

Every case runs in its own try/except; a failure is recorded with its traceback and the run goes
on. Results are written after every case to ``OUT/graph_decode_check.json`` and ``.txt`` (``OUT``:
``--out``, default ``$OUT``, else ``runs/gpu_graph_decode_check``). Exit status 1 when a required
check failed or a case raised. Without CUDA (``--device cpu``, a smoke run of the plumbing) the
graph columns are skipped.

Usage: python scripts/gpu_graph_decode_check.py [--out DIR] [--time-budget 170]
       python scripts/gpu_graph_decode_check.py --device cpu --preset tiny --context 128 (smoke run)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import tpa
from tpa import T6Cache, T6Config, T6ForCausalLM
from tpa.eval.report import atomic_write_json, atomic_write_text, run_metadata
from tpa.models.t6.hf_compat import cache_kwargs

NEW_TOKENS = 16
PROMPT_LENGTHS = (5, 16, 11)
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


def left_padded_prompts(vocab: int, device):
    gen = torch.Generator().manual_seed(1)
    width = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(PROMPT_LENGTHS):
        ids[i, width - n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids.to(device), mask.to(device)


def greedy(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)


def first_divergence(ref, out) -> dict | None:
    """The first (step, row) where the tokens differ, with the reference's score gap between the two
    tokens and the largest score difference of the two runs at that step and row."""
    width = ref.sequences.shape[1] - len(ref.scores)
    diff = (ref.sequences[:, width:] != out.sequences[:, width:]).nonzero()
    if diff.numel() == 0:
        return None
    step = int(diff[:, 1].min())
    row = int(diff[diff[:, 1] == step][0, 0])
    a, b = ref.scores[step][row].float(), out.scores[step][row].float()
    tok_ref, tok_out = int(ref.sequences[row, width + step]), int(out.sequences[row, width + step])
    return {"step": step, "row": row, "gap": float(a[tok_ref] - a[tok_out]),
            "max_score_diff": float((a - b).abs().max())}


def max_score_diff(ref, out) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref.scores, out.scores))


def compare(row: dict, name: str, ref, out) -> bool:
    """Record tokens equal, max score difference and first divergence of ``out`` against ``ref``;
    True when the tokens are equal or first diverge at a near tie (gap <= 2 x score difference)."""
    equal = bool(torch.equal(ref.sequences, out.sequences))
    div = first_divergence(ref, out)
    row[f"{name}_tokens_equal"] = equal
    row[f"{name}_max_score_diff"] = max_score_diff(ref, out)
    row[f"{name}_first_divergence"] = div
    return equal or (div is not None and div["gap"] <= 2 * div["max_score_diff"])


def sync_free_step(model, ids, mask) -> bool:
    """Prefill a static eager cache, run one step, then one more under sync debug mode "error"."""
    cache = new_cache(model, ids.shape[0], ids.shape[1] + 2, "static")
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tok = model(tok, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(tok, attention_mask=mask, cache=cache, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return True


def check_case(model, attention_type: str, dtype, device, cuda: bool) -> dict:
    ids, mask = left_padded_prompts(model.config.vocab_size, device)
    capacity = ids.shape[1] + NEW_TOKENS
    fp32 = dtype == torch.float32
    row = {"attention_type": attention_type, "dtype": str(dtype).replace("torch.", ""), "status": "ok"}
    dynamic = greedy(model, ids, mask, None)
    static = greedy(model, ids, mask, new_cache(model, 3, capacity, "static"))
    static_ok = compare(row, "static_vs_dynamic", dynamic, static)
    required = []
    if cuda:
        cache = new_cache(model, 3, capacity, "graphs")
        graphs = greedy(model, ids, mask, cache)
        row["captures"], row["replays"] = cache.decode_graph.captures, cache.decode_graph.replays
        row["capture_s"] = cache.decode_graph.capture_seconds
        compare(row, "graphs_vs_static", static, graphs)
        graphs_ok = compare(row, "graphs_vs_dynamic", dynamic, graphs)
        required += [
            ("graphs == static eager (tokens)", row["graphs_vs_static_tokens_equal"]),
            ("graphs == static eager (scores bitwise)", row["graphs_vs_static_max_score_diff"] == 0.0),
            ("one capture, a replay per decode step", (row["captures"], row["replays"]) == (1, NEW_TOKENS - 1)),
            ("graphs == dynamic (tokens, fp32)" if fp32 else "graphs == dynamic (tokens, or a near tie, bf16)",
             row["graphs_vs_dynamic_tokens_equal"] if fp32 else graphs_ok),
        ]
        row["sync_free"] = sync_free_step(model, ids, mask)
        required.append(("static step free of host syncs", row["sync_free"]))
    else:
        required.append(("static == dynamic (tokens, fp32)" if fp32 else "static == dynamic (tokens, or a near tie)",
                         row["static_vs_dynamic_tokens_equal"] if fp32 else static_ok))
    row["failed"] = [name for name, ok in required if not ok]
    if row["failed"]:
        row["status"] = "FAILED: " + "; ".join(row["failed"])
    return row


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


def _comparison(r: dict, name: str) -> str:
    div = r[f"{name}_first_divergence"]
    text = (f"{name.replace('_vs_', '==')} tokens={r[f'{name}_tokens_equal']} "
            f"max|dscore|={r[f'{name}_max_score_diff']:.1e}")
    if div is not None:
        text += f" (diverge step {div['step']} row {div['row']}: gap {div['gap']:.3g}, |dscore| {div['max_score_diff']:.3g})"
    return text


def render(record: dict) -> str:
    lines = [f"CUDA-graph decode check: {record['run'].get('device_name')}, {record['run'].get('date')}, "
             f"preset {record['preset']}, torch {torch.__version__}", "",
             "Checks (left-padded batch of 3, 16 greedy tokens):"]
    for r in record["checks"]:
        if not r["status"].startswith(("ok", "FAILED")):
            lines.append(f"  {r['dtype']:9s} {r['attention_type']:11s} {r['status'].splitlines()[0]}")
            continue
        parts = [_comparison(r, "static_vs_dynamic")]
        if "graphs_vs_static_tokens_equal" in r:
            parts += [_comparison(r, "graphs_vs_static"), _comparison(r, "graphs_vs_dynamic"),
                      f"sync-free={r.get('sync_free')} captures={r['captures']} replays={r['replays']}"]
        lines.append(f"  {r['dtype']:9s} {r['attention_type']:11s} " + "; ".join(parts) + f" -> {r['status']}")
    lines += ["", f"Decode step time, batch {record['timing_batch']}, context {record['context']:,}, "
                  f"{record['timing_dtype']} (ms per step):",
              f"  {'type':5s} {'mode':8s} {'forward loop':>13s} {'generate':>10s}  status"]
    for r in record["timings"]:
        f = "" if r.get("forward_ms") is None else f"{r['forward_ms']:.3f}"
        g = "" if r.get("generate_ms") is None else f"{r['generate_ms']:.3f}"
        lines.append(f"  {r['attention_type']:5s} {r['mode']:8s} {f:>13s} {g:>10s}  {r['status'].splitlines()[0]}")
    lines += ["", f"required checks failed or cases raised: {record['failures']}; {record['seconds']:.1f} s", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_graph_decode_check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="small")
    p.add_argument("--types", nargs="+", default=list(tpa.ATTENTION_TYPES))
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
              "timing_dtype": str(timing_dtype).replace("torch.", ""), "new_tokens": NEW_TOKENS,
              "prompt_lengths": list(PROMPT_LENGTHS), "checks": [], "timings": [], "failures": 0, "seconds": 0.0,
              "run": run_metadata(device)}

    def save():
        record["seconds"] = time.perf_counter() - start
        record["failures"] = sum(not r["status"].startswith(("ok", "skipped")) for r in record["checks"]
                                 + record["timings"])
        atomic_write_json(out_dir / "graph_decode_check.json", record)
        text = render(record)
        atomic_write_text(out_dir / "graph_decode_check.txt", text)
        return text

    def over_budget() -> bool:
        return time.perf_counter() - start > args.time_budget

    for attention_type in args.types:
        model = None
        for dtype in (torch.float32, torch.bfloat16):
            row = {"attention_type": attention_type, "dtype": str(dtype).replace("torch.", "")}
            if over_budget():
                row["status"] = "skipped (time budget)"
            else:
                try:
                    if model is None:
                        model = build(attention_type, args.preset, device, torch.float32, 2048)
                    row = check_case(model.to(dtype), attention_type, dtype, device, cuda)
                except Exception as err:  # noqa: BLE001 - record it, go on
                    row.update(status=f"error: {type(err).__name__}: {err}", traceback=traceback.format_exc())
            record["checks"].append(row)
            print(f"check {row['dtype']} {attention_type}: {row['status'].splitlines()[0]}", flush=True)
            save()
        del model
        if cuda:
            torch.cuda.empty_cache()

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
    print(f"wrote {out_dir / 'graph_decode_check.json'} and {out_dir / 'graph_decode_check.txt'}")
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
