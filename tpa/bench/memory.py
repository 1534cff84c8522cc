"""``tpa bench memory``: the paper's Table 1 computed by the library, and the longest context that fits.

For every preset and attention type it builds the :class:`tpa.T6Config` and reports

- the KV-cache numbers cached per token in one layer (``config.kv_cache_elements_per_token()``) and
  in the whole model (times the layer count), and the same in bytes at ``--dtype``;
- the attention parameters of one layer (Table 1's formula, ``config.attention_parameters_per_layer()``)
  and the model's parameter count (counted on a model built on the ``meta`` device, tied embedding
  once) with the bytes of its weights;
- the longest context that fits ``--memory`` at ``--batch`` sequences once the weights are in memory:
  ``floor((memory - weight bytes) / (batch x cache bytes per token))``. Activations, the logits and
  allocator slack are not counted, so this is an upper bound for decoding.

With ``--measure`` (the default on a GPU) it also builds one preset's models on the device, fills a
:class:`tpa.T6Cache` with ``--measure-tokens`` tokens at ``--batch`` and compares the bytes of the
cache tensors, and on a GPU the allocator's growth, with the predicted bytes. The allocator also
holds the cache's RoPE-position table (8 bytes per token and sequence, shared by all layers).

Writes ``memory.json``, ``memory.csv``, ``memory.md`` (and ``measured.csv`` when measuring).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from tpa.utils.args import UsageError

# Table 1 of the paper: KV cache per token per layer, and parameters of one attention layer.
KV_FORMULA = {"mha": "2 h d_h", "mqa": "2 d_h", "gqa": "2 G d_h", "mla": "d_c + d_R",
              "tpa": "(R_K + R_V)(h + d_h)", "tpa_kvonly": "(R_K + R_V)(h + d_h)"}
PARAM_FORMULA = {"mha": "4 d h d_h", "mqa": "2 d d_h (h + 1)", "gqa": "2 d d_h (h + G)",
                 "mla": "d'_c (d + h d_h + h d_R) + d_c (d + 2 h d_h) + d (h d_h + d_R)",
                 "tpa": "d (R_Q + R_K + R_V)(h + d_h) + d h d_h", "tpa_kvonly": "d (R_K + R_V)(h + d_h) + 2 d h d_h"}
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
FIELDS = ["preset", "attention_type", "layers", "d_model", "heads", "head_dim", "kv_formula",
          "kv_elements_per_token_layer", "kv_bytes_per_token_layer", "kv_elements_per_token",
          "kv_bytes_per_token", "attention_params_per_layer", "param_formula", "parameters", "weight_bytes",
          "memory_bytes", "batch", "max_context"]


def model_parameters(config) -> int:
    """Parameters of ``T6ForCausalLM(config)``, counted without allocating them (``meta`` device)."""
    import torch

    from tpa import T6ForCausalLM

    with torch.device("meta"):
        model = T6ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def accounting_row(preset: str, attention_type: str, *, dtype_bytes: int, memory: int, batch: int,
                   **overrides) -> dict:
    """One row of the table (see the module docstring); ``max_context`` is negative when the
    weights alone exceed ``memory``."""
    from tpa import T6Config

    cfg = T6Config.from_preset(preset, attention_type, **overrides)
    per_layer = cfg.kv_cache_elements_per_token()
    per_token = per_layer * cfg.num_hidden_layers
    params = model_parameters(cfg)
    weights = params * dtype_bytes
    free = memory - weights
    max_context = free // (batch * per_token * dtype_bytes) if free >= 0 else -1
    return {
        "preset": preset, "attention_type": attention_type, "layers": cfg.num_hidden_layers,
        "d_model": cfg.hidden_size, "heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
        "kv_formula": KV_FORMULA[attention_type], "kv_elements_per_token_layer": per_layer,
        "kv_bytes_per_token_layer": per_layer * dtype_bytes, "kv_elements_per_token": per_token,
        "kv_bytes_per_token": per_token * dtype_bytes,
        "attention_params_per_layer": cfg.attention_parameters_per_layer(),
        "param_formula": PARAM_FORMULA[attention_type], "parameters": params, "weight_bytes": weights,
        "memory_bytes": memory, "batch": batch, "max_context": max_context,
        "config": {"kv_lora_rank": cfg.kv_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
                   "q_lora_rank": cfg.q_lora_rank, "q_rank": cfg.q_rank, "k_rank": cfg.k_rank, "v_rank": cfg.v_rank,
                   "num_key_value_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size},
    }


def _allocated(device) -> int | None:
    """Bytes held by live CUDA tensors after collecting garbage (None on other devices)."""
    import torch

    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def measure_cache(preset: str, attention_type: str, *, tokens: int, batch: int, device, dtype, chunk: int = 1024,
                  **overrides) -> dict:
    """Fill a :class:`tpa.T6Cache` with ``tokens`` tokens per sequence and measure what it holds.

    Returns bytes of the cache tensors (all layers), the bytes Table 1 predicts, and on CUDA the
    growth of live tensor bytes from just before the cache existed (after a warm-up forward pass and a
    garbage collection) to after it was filled; that growth also holds the cache's position table.
    """
    import torch

    from tpa import T6Cache, T6Config, T6ForCausalLM

    cfg = T6Config.from_preset(preset, attention_type, **overrides)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, tokens)
    model = T6ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), device=device)
    with torch.no_grad():  # warm-up: library workspaces (cuBLAS) are allocated once, before the count starts
        model(input_ids=ids[:, : min(tokens, chunk)], use_cache=False, logits_to_keep=1)
    before = _allocated(device)
    cache = T6Cache.for_model(model, batch, capacity=tokens)
    with torch.no_grad():
        for piece in ids.split(chunk, dim=1):
            model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1)
    after = _allocated(device)
    allocator = None if before is None else after - before
    held = sum(buf.numel() * buf.element_size() for layer in cache.kv.layers for buf in layer.buffers.values())
    elements = cache.elements_per_token()
    predicted = cfg.kv_cache_elements_per_token() * cfg.num_hidden_layers * tokens * batch * dtype.itemsize
    positions = cache.kv.positions.numel() * cache.kv.positions.element_size() if cache.kv.positions is not None else 0
    del cache, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "attention_type": attention_type, "tokens": tokens, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "measured_elements_per_token_layer": elements[0],
            "predicted_elements_per_token_layer": cfg.kv_cache_elements_per_token(),
            "cache_tensor_bytes": held, "predicted_bytes": predicted, "position_table_bytes": positions,
            "allocator_bytes": allocator, "matches": held == predicted and len(set(elements)) == 1}


def _run(args) -> int:
    record = run(args)
    if not all(m["matches"] for m in record["measured"]):
        print("error: a measured cache differs from Table 1's prediction (see measured.csv)", file=sys.stderr)
        return 1
    return 0


def run(args) -> dict:
    """Build the table, optionally measure, write the files; return the JSON record."""
    import torch

    from tpa.utils.args import parse_bytes, parse_list
    from tpa.utils.devices import resolve_device
    from tpa.utils.files import atomic_write_csv, atomic_write_json, atomic_write_text, print_written
    from tpa.utils.runinfo import run_metadata
    from tpa.utils.tables import fmt_bytes, fmt_int, markdown_table
    from tpa.models.presets import ATTENTION_TYPES, PRESETS

    presets = parse_list(args.presets, PRESETS, "preset")
    types = parse_list(args.types, ATTENTION_TYPES, "attention type")
    memory = parse_bytes(args.memory)
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.measure_tokens < 1:
        raise UsageError(f"--measure-tokens must be >= 1, got {args.measure_tokens}")
    dtype_bytes = DTYPE_BYTES[args.dtype]
    rows = [accounting_row(p, t, dtype_bytes=dtype_bytes, memory=memory, batch=args.batch)
            for p in presets for t in types]
    too_big = [r for r in rows if r["max_context"] < 0]
    if too_big:
        names = ", ".join(f"{r['preset']}/{r['attention_type']} ({fmt_bytes(r['weight_bytes'])})" for r in too_big)
        raise UsageError(f"--memory {args.memory} ({fmt_bytes(memory)}) is smaller than the weights of {names}; "
                         "give a larger budget or fewer --presets")
    device = resolve_device(args.device)
    measure = args.measure == "on" or (args.measure == "auto" and device.type == "cuda")
    measured = []
    if measure:
        mpreset = args.measure_preset or presets[0]
        if mpreset not in PRESETS:
            raise UsageError(f"unknown --measure-preset {mpreset!r}; expected one of {', '.join(PRESETS)}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        for t in types:
            m = measure_cache(mpreset, t, tokens=args.measure_tokens, batch=args.batch, device=device, dtype=dtype)
            measured.append(m)
            print(f"measured {mpreset}/{t}: cache tensors {fmt_bytes(m['cache_tensor_bytes'])}, "
                  f"predicted {fmt_bytes(m['predicted_bytes'])}"
                  + (f", allocator +{fmt_bytes(m['allocator_bytes'])}" if m["allocator_bytes"] is not None else ""))
    info = run_metadata(device)
    out = Path(args.output)
    table = markdown_table(
        ["preset", "type", "h", "KV cache / token / layer (Table 1)", "elements", "bytes / token / layer",
         "bytes / token (model)", "attn. params / layer", "params", "weights",
         f"max context @ {args.memory}, batch {args.batch}"],
        [[r["preset"], r["attention_type"], r["heads"], r["kv_formula"], fmt_int(r["kv_elements_per_token_layer"]),
          fmt_int(r["kv_bytes_per_token_layer"]), fmt_bytes(r["kv_bytes_per_token"]),
          fmt_int(r["attention_params_per_layer"]), fmt_int(r["parameters"]), fmt_bytes(r["weight_bytes"]),
          fmt_int(r["max_context"])] for r in rows],
        align="llrlrrrrrrr")
    text = (f"KV-cache and parameter accounting ({args.dtype}; max context = (memory - weights) / (batch x "
            f"cache bytes per token), activations not counted), {info['date']}.\n\n" + table)
    if measured:
        text += (f"\nMeasured on {info['device_name']} ({measured[0]['tokens']} tokens, batch {args.batch}):\n\n"
                 + markdown_table(
                     ["preset", "type", "elements / token / layer (cache tensors)", "cache tensor bytes",
                      "predicted bytes",
                      "allocator growth", "matches"],
                     [[m["preset"], m["attention_type"], fmt_int(m["measured_elements_per_token_layer"]),
                       fmt_int(m["cache_tensor_bytes"]), fmt_int(m["predicted_bytes"]),
                       "" if m["allocator_bytes"] is None else fmt_int(m["allocator_bytes"]),
                       "yes" if m["matches"] else "NO"] for m in measured], align="llrrrrl"))
    record = {"dtype": args.dtype, "memory": args.memory, "memory_bytes": memory, "batch": args.batch,
              "rows": rows, "measured": measured, "run": info}
    paths = [atomic_write_json(out / "memory.json", record), atomic_write_csv(out / "memory.csv", rows, FIELDS),
             atomic_write_text(out / "memory.md", text)]
    if measured:
        paths.append(atomic_write_csv(out / "measured.csv", measured, list(measured[0])))
    print(text, end="")
    print_written(paths)
    return record
