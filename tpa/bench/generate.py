"""``tpa bench generate``: end-to-end generation speed and peak memory of TPA against MHA, GQA and MLA,
and against transformers' own ``LlamaForCausalLM``.

The models are a preset's (``--preset``, default ``small``) for each attention type, with the head
counts of the paper's Table 10, so their parameter counts match; weights are random (speed does not
depend on them). Type ``llama`` is transformers' ``LlamaForCausalLM`` at the width, depth and KV
heads of the preset's ``gqa`` (``llama-mha`` and ``llama-mqa``: of its ``mha`` and ``mqa``;
:mod:`tpa.bench.hf_llama`), run by the same protocol with
transformers' own caches (``StaticCache`` where the T6 types use a static cache, so that on a GPU
``generate`` auto-compiles its decode step as it does for ``cache_implementation="static"``). For
every batch size and context length it runs twice, with ``--short-tokens`` and with
``--new-tokens`` new tokens:

1. draws a random prompt of ``context`` tokens per sequence (the same for both runs);
2. prefills a fresh (or reset) cache with the first ``context - 1`` tokens, ``--prefill-chunk``
   tokens per forward call (a whole 128K prompt in one call would need a 128K x 128K attention mask);
3. calls ``model.generate`` on the whole prompt with that cache, greedy, for exactly that many new
   tokens (the last prompt token is processed inside ``generate``).

The decode time is the difference of the two ``generate`` times, over the difference of the token
counts: what ``generate`` costs once per call (cache bookkeeping, graph capture, the prompt's last
token) cancels, and is reported separately as ``generate_fixed_s``.

On CUDA the decode steps replay a captured CUDA graph by default (``--cuda-graphs``; a static
:class:`tpa.T6Cache` of capacity ``context + --new-tokens``, see :mod:`tpa.models.t6.decode_graph`);
``--no-cuda-graphs`` decodes eagerly with a dynamic cache. The warm-up generation below uses the
point's own cache, so the graph is captured there and the timed run only replays it; the capture
time is reported per point (``graph_capture_s``). The mode used is recorded (``decode_mode``).

It reports prefill tokens/s (prompt tokens over step 2's time), decode tokens/s (the extra tokens
of the long run over its extra time), end-to-end tokens/s (the long run's tokens over its whole
time, prefill included),
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpa.utils.args import UsageError

FIELDS = ["attention_type", "parameters", "heads", "kv_heads", "batch", "context", "new_tokens", "short_new_tokens",
          "status", "prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s", "end_to_end_tokens_per_s",
          "generate_short_s", "generate_long_s", "generate_fixed_s", "kv_cache_bytes", "predicted_kv_cache_bytes",
          "peak_memory_bytes", "prefill_chunk", "decode_mode", "graph_capture_s"]


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


def _held_bytes(cache) -> int:
    """Bytes the cache's tensors hold (a T6Cache or a transformers cache)."""
    from tpa.bench.hf_llama import cache_bytes

    kv = getattr(cache, "kv", None)
    if kv is not None:
        return sum(b.numel() * b.element_size() for layer in kv.layers for b in layer.buffers.values())
    return cache_bytes(cache)


def _generate_once(model, ids, mask, new_tokens: int, chunk: int, device, cache) -> dict:
    """Prefill ``cache`` with all prompt tokens but the last, then ``generate`` ``new_tokens``."""
    import torch

    from tpa.models.t6.hf_compat import cache_kwargs

    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for piece in ids[:, :-1].split(chunk, dim=1):
            model(input_ids=piece, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    _sync(device)
    t1 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    t2 = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"generate returned {generated} new tokens, expected {new_tokens}")
    return {"prefill_s": t1 - t0, "generate_s": t2 - t1, "held": _held_bytes(cache)}


def generate_point(model, *, batch: int, context: int, new_tokens: int, short_tokens: int, chunk: int, device,
                   new_cache) -> dict:
    """Time one (batch, context) point as described in the module docstring.

    ``new_cache()`` gives the cache of each run: a fresh one, or a static one after ``reset()``
    (whose CUDA graph, or transformers' compiled step, a warm-up call has prepared)."""
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=device)
    mask = torch.ones_like(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    short = _generate_once(model, ids, mask, short_tokens, chunk, device, new_cache())
    long = _generate_once(model, ids, mask, new_tokens, chunk, device, new_cache())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    decode_s = long["generate_s"] - short["generate_s"]
    steps = new_tokens - short_tokens
    per_step = decode_s / steps
    prefill_tokens = batch * (context - 1)
    total = long["prefill_s"] + long["generate_s"]
    return {"prefill_s": long["prefill_s"], "decode_s": decode_s,
            "prefill_tokens_per_s": prefill_tokens / long["prefill_s"] if prefill_tokens and long["prefill_s"] > 0
            else None,
            # a difference at or below the timer's noise has no rate
            "decode_tokens_per_s": batch * steps / decode_s if decode_s > 0 else None,
            "end_to_end_tokens_per_s": batch * new_tokens / total,
            "generate_short_s": short["generate_s"], "generate_long_s": long["generate_s"],
            "generate_fixed_s": short["generate_s"] - short_tokens * per_step,
            "kv_cache_bytes": long["held"], "peak_memory_bytes": peak}


def _build(cfg, device, dtype):
    import torch

    from tpa import T6ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = T6ForCausalLM(cfg)
    return model.to(dtype).eval()


def _model_and_caches(kind: str, cfg, device, dtype, batch: int, capacity: int, graphs: bool):
    """The model of a point and its cache source: ``new_cache()`` gives a fresh cache per run, or the
    one static cache, reset (its CUDA graph, or transformers' compiled step, survives the reset).
    ``kind`` is a T6 attention type or one of :data:`tpa.bench.hf_llama.LLAMA_TYPES` (``cfg`` then a
    ``LlamaConfig``)."""
    from tpa import T6Cache
    from tpa.bench.hf_llama import LLAMA_TYPES, build_llama, llama_cache

    if kind in LLAMA_TYPES:
        model = build_llama(cfg, device, dtype)
        make = lambda: llama_cache(model, capacity, static=graphs)  # noqa: E731
    else:
        model = _build(cfg, device, dtype)
        make = lambda: T6Cache.for_model(model, batch, capacity=capacity, static=graphs,  # noqa: E731
                                         cuda_graphs=graphs)
    if not graphs:
        return model, make, None
    cache = make()

    def reset():
        cache.reset()
        return cache

    return model, reset, cache


@dataclass
class _Plan:
    """What a run measures, from its checked arguments (see :func:`_plan`)."""

    types: list[str]
    contexts: list[int]
    batches: list[int]
    short_tokens: int
    device: Any
    dtype: Any
    graphs: bool  # decode steps replay a CUDA graph (a static cache); else eager with a dynamic cache
    capacity: int | None  # the device's memory in bytes (None: unknown)
    configs: dict = field(default_factory=dict)  # type -> T6Config (a Llama type: a LlamaConfig)
    params: dict = field(default_factory=dict)  # type -> parameter count

    @property
    def decode_mode(self) -> str:
        return "cuda-graphs" if self.graphs else "eager"


def _plan(args) -> _Plan:
    """Check the arguments (:class:`UsageError` for a bad one) and resolve the device and dtype."""
    from tpa.bench.hf_llama import LLAMA_TYPES
    from tpa.models.presets import ATTENTION_TYPES, PRESETS
    from tpa.utils.args import parse_ints, parse_list
    from tpa.utils.devices import resolve_device, resolve_dtype

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    types = parse_list(args.types, (*ATTENTION_TYPES, *LLAMA_TYPES), "attention type")
    contexts = sorted(parse_ints(args.contexts, "context length", minimum=2))
    batches = sorted(parse_ints(args.batch_sizes, "batch size"))
    if args.new_tokens < 2:
        raise UsageError("--new-tokens must be >= 2 (the decode time is the difference of two runs), "
                         f"got {args.new_tokens}")
    short_tokens = max(1, args.new_tokens // 8) if args.short_tokens is None else args.short_tokens
    if not 1 <= short_tokens < args.new_tokens:
        raise UsageError(f"--short-tokens must be >= 1 and below --new-tokens ({args.new_tokens}), got {short_tokens}")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UsageError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    graphs = device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs
    if graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, got {device}")
    types = _with_padded_caches(types, getattr(args, "cache_head_multiple", None) or [1])
    return _Plan(types=types, contexts=contexts, batches=batches, short_tokens=short_tokens, device=device,
                 dtype=dtype, graphs=graphs, capacity=_device_memory(device))


PAD_SUFFIX = "-pad"
PADDABLE = ("tpa", "tpa_kvonly")


def _with_padded_caches(types: list[str], multiples: list[int]) -> list[str]:
    """``types`` with, after each TPA type, one ``TYPE-padM`` row per multiple M > 1 of
    ``--cache-head-multiple`` (``T6Config.tpa_cache_head_multiple``: the A caches padded to a multiple
    of M heads); a multiple of 1 keeps the plain row, and leaving 1 out drops it."""
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in multiples):
        raise UsageError(f"--cache-head-multiple takes integers >= 1, got {multiples}")
    if multiples != [1] and not any(t in PADDABLE for t in types):
        raise UsageError(f"--cache-head-multiple pads the caches of {' and '.join(PADDABLE)}; --types has neither")
    out = []
    for t in types:
        if t not in PADDABLE:
            out.append(t)
            continue
        out += [t if m == 1 else f"{t}{PAD_SUFFIX}{m}" for m in dict.fromkeys(multiples)]
    return out


def _base_type(kind: str) -> tuple[str, int]:
    """``("tpa", 16)`` for ``tpa-pad16``; ``(kind, 1)`` otherwise."""
    base, sep, multiple = kind.rpartition(PAD_SUFFIX)
    return (base, int(multiple)) if sep and base in PADDABLE and multiple.isdigit() else (kind, 1)


def _add_configs(plan: _Plan, args) -> None:
    """The model configuration and parameter count of every type, long enough for the longest point."""
    from tpa import T6Config
    from tpa.bench.hf_llama import LLAMA_TYPES, llama_config_like, llama_parameters
    from tpa.bench.memory import model_parameters

    max_len = max(plan.contexts) + args.new_tokens
    plan.configs = {t: T6Config.from_preset(args.preset, _base_type(t)[0], max_position_embeddings=max_len,
                                            decode_impl=args.decode_impl, tpa_cache_head_multiple=_base_type(t)[1])
                    for t in plan.types if t not in LLAMA_TYPES}
    plan.params = {t: model_parameters(cfg) for t, cfg in plan.configs.items()}
    for t in plan.types:
        if t in LLAMA_TYPES:  # matched to the preset's GQA, MHA or MQA
            plan.configs[t] = llama_config_like(T6Config.from_preset(args.preset, LLAMA_TYPES[t],
                                                                     max_position_embeddings=max_len))
            plan.params[t] = llama_parameters(plan.configs[t])


def _point_row(plan: _Plan, args, kind: str, batch: int, context: int) -> dict:
    """The fields of a point's row known before it runs (its sizes, the predicted cache bytes)."""
    from tpa.bench.hf_llama import LLAMA_TYPES, kv_bytes_per_token

    cfg, itemsize = plan.configs[kind], plan.dtype.itemsize
    if kind in LLAMA_TYPES:
        per_token = kv_bytes_per_token(cfg, itemsize)
        mode = "static cache, transformers auto-compile" if plan.graphs else "eager"
    else:
        per_token = cfg.kv_cache_stored_elements_per_token() * cfg.num_hidden_layers * itemsize
        mode = plan.decode_mode
    return {"attention_type": kind, "parameters": plan.params[kind], "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None), "batch": batch, "context": context,
            "new_tokens": args.new_tokens, "short_new_tokens": plan.short_tokens,
            "prefill_chunk": args.prefill_chunk,
            "predicted_kv_cache_bytes": per_token * batch * (context + args.new_tokens), "decode_mode": mode}


def _skip_status(plan: _Plan, args, base: dict, oom: dict, elapsed: float) -> str | None:
    """Why the point of row ``base`` is not run (None: it runs). ``oom`` maps (type, batch) to the
    smallest context that ran out of memory."""
    kind, batch, context = base["attention_type"], base["batch"], base["context"]
    weights = plan.params[kind] * plan.dtype.itemsize
    if plan.capacity is not None and weights + base["predicted_kv_cache_bytes"] > plan.capacity:
        return "does not fit"
    if (kind, batch) in oom:
        return "OOM (a shorter context already ran out)"
    if args.max_prompt_tokens is not None and batch * context > args.max_prompt_tokens:
        return f"skipped (batch x context > --max-prompt-tokens {args.max_prompt_tokens})"
    if args.time_budget is not None and elapsed > args.time_budget:
        return "skipped (time budget)"
    return None


def _measure(plan: _Plan, args, base: dict, oom: dict) -> dict:
    """Warm up and time the point of row ``base``; returns its row. A CUDA out-of-memory error is
    recorded as ``OOM`` (and in ``oom``), any other error as ``error: ...`` with its traceback."""
    import torch

    from tpa.utils.tables import fmt_bytes

    kind, batch, context = base["attention_type"], base["batch"], base["context"]
    where = f"{kind} batch {batch} context {context}"
    model = cache = new_cache = None
    try:
        # a static cache serves the warm-up and the timed runs: it keeps its captured graph
        model, new_cache, cache = _model_and_caches(kind, plan.configs[kind], plan.device, plan.dtype, batch,
                                                    context + args.new_tokens, plan.graphs)
        generate_point(model, batch=batch, context=min(context, 64), new_tokens=2, short_tokens=1,
                       chunk=args.prefill_chunk, device=plan.device, new_cache=new_cache)  # warm-up
        timing = generate_point(model, batch=batch, context=context, new_tokens=args.new_tokens,
                                short_tokens=plan.short_tokens, chunk=args.prefill_chunk, device=plan.device,
                                new_cache=new_cache)
        if getattr(cache, "decode_graph", None) is not None:
            timing["graph_capture_s"] = cache.decode_graph.capture_seconds
        row = {**base, "status": "ok", **timing}
        print(f"{where}: prefill {timing['prefill_tokens_per_s'] or 0:,.0f} tok/s, "
              f"decode {timing['decode_tokens_per_s'] or 0:,.1f} tok/s, end-to-end "
              f"{timing['end_to_end_tokens_per_s']:,.1f} tok/s, cache "
              f"{fmt_bytes(timing['kv_cache_bytes'])}",
              flush=True)
    except torch.cuda.OutOfMemoryError:
        oom[(kind, batch)] = context
        row = {**base, "status": "OOM"}
        print(f"{where}: out of memory", flush=True)
    except Exception as err:  # noqa: BLE001 - record it, go on with the other points
        row = {**base, "status": f"error: {type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(f"{where}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    del model, cache, new_cache
    _free(plan.device)
    return row


def run(args) -> dict:
    """Run the benchmark, write the files (after every point, so an interrupted run keeps what it
    measured), return the JSON record."""
    from tpa.utils.files import print_written
    from tpa.utils.runinfo import run_metadata

    plan = _plan(args)
    start = time.perf_counter()
    _add_configs(plan, args)
    types, batches, contexts = plan.types, plan.batches, plan.contexts
    record = {"preset": args.preset, "dtype": str(plan.dtype).replace("torch.", ""), "types": types,
              "contexts": contexts, "batch_sizes": batches, "new_tokens": args.new_tokens,
              "short_new_tokens": plan.short_tokens, "prefill_chunk": args.prefill_chunk,
              "max_prompt_tokens": args.max_prompt_tokens, "decode_impl": args.decode_impl,
              "decode_mode": plan.decode_mode, "complete": False,
              "rows": [], "seconds": None, "run": run_metadata(plan.device)}
    out = Path(args.output)
    results: dict[tuple[str, int, int], dict] = {}
    oom: dict[tuple[str, int], int] = {}  # (type, batch) -> smallest context that ran out of memory
    # every type runs the same point before the next, cheapest first, so a time budget cuts all types alike
    for c in contexts:
        for b in batches:
            for t in types:
                base = _point_row(plan, args, t, b, c)
                status = _skip_status(plan, args, base, oom, time.perf_counter() - start)
                if status is not None:
                    results[(t, b, c)] = {**base, "status": status}
                    continue
                results[(t, b, c)] = _measure(plan, args, base, oom)
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
        ["type", "params", "heads (KV)", "batch", "context", "prefill tok/s", "decode tok/s", "end-to-end tok/s",
         "generate fixed s", "KV cache", "peak memory", "status"],
        [[r["attention_type"], fmt_int(r["parameters"]),
          f"{r['heads']} ({r['kv_heads']})" if r.get("kv_heads") else str(r["heads"]), r["batch"],
          fmt_int(r["context"]), cell(r, "prefill_tokens_per_s", 0), cell(r, "decode_tokens_per_s"),
          cell(r, "end_to_end_tokens_per_s"), cell(r, "generate_fixed_s", 3),
          fmt_bytes(r["kv_cache_bytes"]) if r.get("kv_cache_bytes")
          else fmt_bytes(r["predicted_kv_cache_bytes"]) + " (pred.)",
          fmt_bytes(r.get("peak_memory_bytes")), r["status"].split("\n")[0][:80]] for r in rows],
        align="lrrrrrrrrrrl")
    text = (f"Generation benchmark: preset {record['preset']}, {record['dtype']}, {record['new_tokens']} new tokens "
            f"(decode: minus a run of {record.get('short_new_tokens', '?')}), greedy, prefill chunk {record['prefill_chunk']}, decode_impl {record['decode_impl']}, "
            f"decode {record.get('decode_mode', 'eager')}; "
            f"{info['device_name']}, {info['date']}" + ("" if final else " (incomplete)") + ".\n\n" + table)
    paths = [atomic_write_json(out / "generate.json", record), atomic_write_csv(out / "generate.csv", rows, FIELDS),
             atomic_write_text(out / "generate.md", text)]
    return paths, text
