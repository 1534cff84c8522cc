"""``tpa bench generate``: end-to-end generation speed and peak memory of TPA against MHA, GQA and MLA.

The models are a preset's (``--preset``, default ``small``) for each attention type, with the head
counts of the paper's Table 10, so their parameter counts match; weights are random (speed does not
depend on them). For every batch size and context length it:

1. draws a random prompt of ``context`` tokens per sequence;
2. prefills a :class:`tpa.T6Cache` with the first ``context - 1`` tokens, ``--prefill-chunk`` tokens
   per forward call (a whole 128K prompt in one call would need a 128K x 128K attention mask);
3. calls ``model.generate`` on the whole prompt with that cache, greedy, for exactly
   ``--new-tokens`` tokens (the last prompt token is processed inside ``generate``).

On CUDA the decode steps replay a captured CUDA graph by default (``--cuda-graphs``; a static
:class:`tpa.T6Cache` of capacity ``context + --new-tokens``, see :mod:`tpa.models.t6.decode_graph`);
``--no-cuda-graphs`` decodes eagerly with a dynamic cache. The warm-up generation below uses the
point's own cache, so the graph is captured there and the timed run only replays it; the capture
time is reported per point (``graph_capture_s``). The mode used is recorded (``decode_mode``).

It reports prefill tokens/s (prompt tokens over step 2's time), decode tokens/s (generated tokens
over step 3's time), end-to-end tokens/s (generated tokens over the whole time, prefill included),
the bytes the cache tensors hold, and on a GPU the peak of the CUDA allocator. Points whose weights
plus predicted cache exceed the device's memory are marked ``does not fit`` without running; a CUDA
out-of-memory error is recorded as ``OOM``; after ``--time-budget`` seconds the remaining points are
marked ``skipped``, as are points of more than ``--max-prompt-tokens`` prompt tokens. Points run in
order of context, then batch, each for every type before the next, so a budget cuts all types alike;
each model is built afresh for its point (the same seed, so the same weights) and warmed up with a
short generation before timing, so the peak memory is that point's alone.

Writes ``generate.json``, ``generate.csv`` and ``generate.md``.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from pathlib import Path

from tpa.utils.args import UsageError

FIELDS = ["attention_type", "parameters", "heads", "batch", "context", "new_tokens", "status", "prefill_s", "decode_s",
          "prefill_tokens_per_s", "decode_tokens_per_s", "end_to_end_tokens_per_s", "kv_cache_bytes",
          "predicted_kv_cache_bytes", "peak_memory_bytes", "prefill_chunk", "decode_mode", "graph_capture_s"]


def _run(args) -> int:
    record = run(args)
    failed = [r for r in record["rows"] if r["status"].startswith("error")]
    if failed:
        print(f"error: {len(failed)} point(s) failed; see generate.json", file=sys.stderr)
        return 1
    return 0


def _device_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def generate_point(model, *, batch: int, context: int, new_tokens: int, chunk: int, device,
                   capacity: int | None = None, cache=None) -> dict:
    """Time one (batch, context) point as described in the module docstring.

    ``capacity`` sizes a new dynamic cache (default ``context + new_tokens``); a warm-up passes the
    capacity of the point it prepares, since the decode kernel's launch configuration depends on it.
    ``cache``: use (after ``reset()``) this :class:`tpa.T6Cache` instead, e.g. a static one whose
    CUDA graph a warm-up call has captured."""
    import torch

    from tpa import T6Cache
    from tpa.models.t6.hf_compat import cache_kwargs

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=device)
    mask = torch.ones_like(ids)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if cache is None:
        cache = T6Cache.for_model(model, batch, capacity=capacity or context + new_tokens)
    else:
        cache.reset()
    with torch.no_grad():
        for piece in ids[:, :-1].split(chunk, dim=1):
            model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    t1 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    t2 = time.perf_counter()
    generated = out.shape[1] - context
    if generated != new_tokens:
        raise RuntimeError(f"generate returned {generated} new tokens, expected {new_tokens}")
    held = sum(b.numel() * b.element_size() for layer in cache.kv.layers for b in layer.buffers.values())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    prefill_tokens = batch * (context - 1)
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1,
            "prefill_tokens_per_s": prefill_tokens / (t1 - t0) if prefill_tokens and t1 > t0 else None,
            "decode_tokens_per_s": batch * new_tokens / (t2 - t1),
            "end_to_end_tokens_per_s": batch * new_tokens / (t2 - t0), "kv_cache_bytes": held,
            "peak_memory_bytes": peak}


def _build(cfg, device, dtype):
    import torch

    from tpa import T6ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = T6ForCausalLM(cfg)
    return model.to(dtype).eval()


def _skip_reason(args, base: dict, weight_bytes: int, capacity, shorter_ran_out: bool, start: float):
    """Why a point is not run (it cannot fit, a shorter context ran out of memory, a limit), or None."""
    if capacity is not None and weight_bytes + base["predicted_kv_cache_bytes"] > capacity:
        return "does not fit"
    if shorter_ran_out:
        return "OOM (a shorter context already ran out)"
    if args.max_prompt_tokens is not None and base["batch"] * base["context"] > args.max_prompt_tokens:
        return f"skipped (batch x context > --max-prompt-tokens {args.max_prompt_tokens})"
    if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
        return "skipped (time budget)"
    return None


def _timed_point(model, cache, args, batch: int, context: int, device) -> dict:
    """A short warm-up generation (kernels, allocator, graph capture), then the timed one."""
    generate_point(model, batch=batch, context=min(context, 64), new_tokens=2, chunk=args.prefill_chunk,
                   device=device, cache=cache)
    timing = generate_point(model, batch=batch, context=context, new_tokens=args.new_tokens,
                            chunk=args.prefill_chunk, device=device, cache=cache)
    if cache.decode_graph is not None:
        timing["graph_capture_s"] = cache.decode_graph.capture_seconds
    return timing


def run(args) -> dict:
    """Run the benchmark, write the files (after every point, so an interrupted run keeps what it
    measured), return the JSON record."""
    import torch

    from tpa import T6Cache, T6Config
    from tpa.bench.memory import model_parameters
    from tpa.utils.args import parse_ints, parse_list
    from tpa.utils.devices import resolve_device, resolve_dtype
    from tpa.utils.files import print_written
    from tpa.utils.runinfo import run_metadata
    from tpa.utils.tables import fmt_bytes
    from tpa.models.presets import ATTENTION_TYPES, PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    types = parse_list(args.types, ATTENTION_TYPES, "attention type")
    contexts = sorted(parse_ints(args.contexts, "context length", minimum=2))
    batches = sorted(parse_ints(args.batch_sizes, "batch size"))
    if args.new_tokens < 1:
        raise UsageError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UsageError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    if graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, got {device}")
    decode_mode = "cuda-graphs" if graphs else "eager"
    capacity = _device_memory(device)
    max_len = max(contexts) + args.new_tokens
    start = time.perf_counter()
    configs = {t: T6Config.from_preset(args.preset, t, max_position_embeddings=max_len, decode_impl=args.decode_impl)
               for t in types}
    params = {t: model_parameters(cfg) for t, cfg in configs.items()}
    info = run_metadata(device)
    record = {"preset": args.preset, "dtype": str(dtype).replace("torch.", ""), "types": types, "contexts": contexts,
              "batch_sizes": batches, "new_tokens": args.new_tokens, "prefill_chunk": args.prefill_chunk,
              "max_prompt_tokens": args.max_prompt_tokens, "decode_impl": args.decode_impl,
              "decode_mode": decode_mode, "complete": False,
              "rows": [], "seconds": None, "run": info}
    out = Path(args.output)
    results: dict[tuple[str, int, int], dict] = {}
    oom: dict[tuple[str, int], int] = {}  # (type, batch) -> smallest context that ran out of memory
    # every type runs the same point before the next, cheapest first, so a time budget cuts all types alike
    for c in contexts:
        for b in batches:
            for t in types:
                cfg = configs[t]
                per_token = cfg.kv_cache_elements_per_token() * cfg.num_hidden_layers * dtype.itemsize
                base = {"attention_type": t, "parameters": params[t], "heads": cfg.num_attention_heads, "batch": b,
                        "context": c, "new_tokens": args.new_tokens, "prefill_chunk": args.prefill_chunk,
                        "predicted_kv_cache_bytes": per_token * b * (c + args.new_tokens), "decode_mode": decode_mode}
                status = _skip_reason(args, base, params[t] * dtype.itemsize, capacity, (t, b) in oom, start)
                if status is not None:
                    results[(t, b, c)] = {**base, "status": status}
                    continue
                model = cache = None
                try:
                    model = _build(cfg, device, dtype)
                    # one cache for the warm-up and the timed run: a static one keeps its captured graph
                    cache = T6Cache.for_model(model, b, capacity=c + args.new_tokens, static=graphs,
                                              cuda_graphs=graphs)
                    timing = _timed_point(model, cache, args, b, c, device)
                    results[(t, b, c)] = {**base, "status": "ok", **timing}
                    print(f"{t} batch {b} context {c}: prefill {timing['prefill_tokens_per_s'] or 0:,.0f} tok/s, "
                          f"decode {timing['decode_tokens_per_s']:,.1f} tok/s, end-to-end "
                          f"{timing['end_to_end_tokens_per_s']:,.1f} tok/s, cache "
                          f"{fmt_bytes(timing['kv_cache_bytes'])}",
                          flush=True)
                except torch.cuda.OutOfMemoryError:
                    oom[(t, b)] = c
                    results[(t, b, c)] = {**base, "status": "OOM"}
                    print(f"{t} batch {b} context {c}: out of memory", flush=True)
                except Exception as err:  # noqa: BLE001 - record it, go on with the other points
                    results[(t, b, c)] = {**base, "status": f"error: {type(err).__name__}: {err}",
                                          "traceback": traceback.format_exc()}
                    print(f"{t} batch {b} context {c}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                del model, cache
                _free(device)
                record["rows"] = [results[k] for k in sorted(results, key=_order(types))]
                _write(record, out, final=False)
    record["rows"] = [results[(t, b, c)] for t in types for b in batches for c in contexts]
    record["complete"] = True
    record["seconds"] = time.perf_counter() - start
    paths, text = _write(record, out, final=True)
    print(text, end="")
    print_written(paths)
    return record


def _order(types):
    return lambda key: (types.index(key[0]), key[1], key[2])


def _write(record: dict, out: Path, *, final: bool):
    """Write generate.json/.csv/.md; returns the paths and the markdown text."""
    from tpa.utils.files import atomic_write_csv, atomic_write_json, atomic_write_text
    from tpa.utils.tables import fmt_bytes, fmt_int, markdown_table

    def cell(r, key, digits=1):
        v = r.get(key)
        return "" if v is None else f"{v:,.{digits}f}"

    rows = record["rows"]
    info = record["run"]
    table = markdown_table(
        ["type", "params", "batch", "context", "prefill tok/s", "decode tok/s", "end-to-end tok/s", "KV cache",
         "peak memory", "status"],
        [[r["attention_type"], fmt_int(r["parameters"]), r["batch"], fmt_int(r["context"]),
          cell(r, "prefill_tokens_per_s", 0), cell(r, "decode_tokens_per_s"), cell(r, "end_to_end_tokens_per_s"),
          fmt_bytes(r["kv_cache_bytes"]) if r.get("kv_cache_bytes")
          else fmt_bytes(r["predicted_kv_cache_bytes"]) + " (pred.)",
          fmt_bytes(r.get("peak_memory_bytes")), r["status"].split("\n")[0][:80]] for r in rows],
        align="lrrrrrrrrl")
    text = (f"Generation benchmark: preset {record['preset']}, {record['dtype']}, {record['new_tokens']} new tokens, "
            f"greedy, prefill chunk {record['prefill_chunk']}, decode_impl {record['decode_impl']}, "
            f"decode {record.get('decode_mode', 'eager')}; "
            f"{info['device_name']}, {info['date']}" + ("" if final else " (incomplete)") + ".\n\n" + table)
    paths = [atomic_write_json(out / "generate.json", record), atomic_write_csv(out / "generate.csv", rows, FIELDS),
             atomic_write_text(out / "generate.md", text)]
    return paths, text
