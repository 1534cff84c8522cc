"""``tpa convert llama``: a Llama-style model (HF ``LlamaForCausalLM``/``MistralForCausalLM``, or a T6
``mha``/``gqa``/``mqa`` directory) becomes a T6 model with Tensor Product Attention.

Embeddings, norms, MLPs and the output projection are carried over unchanged; each attention layer
becomes TPA (TPA-KVonly by default: the pretrained query projection is kept).

- ``exact=True``: GQA with G key/value heads is TPA-KVonly with non-contextual head factors of rank
  G (paper Section 4): ``A_k[r, h] = G`` when head ``h`` belongs to group ``r`` (else 0) and
  ``B_k(x) = W_k x`` reshaped ``[G, D]``, so ``(1/G) A_k^T B_k`` is each head's group key; the same
  for V, and for Q (rank H, ``A_q = H I``) when the query is factorised too. Logits equal the source's.
- otherwise (ranks below the exact ones): contextual head and feature factors fitted to the source's
  projections on calibration tokens (:mod:`tpa.convert.factor_fit`), with the relative error of K, V
  (Q) and of each attention layer's output on held-out calibration tokens in the report.

Source loading goes through a T6 ``mha``/``gqa``/``mqa`` model first (same weights, our layout), which
is checked against transformers' own model for HF sources; the converted model is checked against
that source model (exact: equal logits) and after writing, against its reloaded copy.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tpa.convert.common import (ConversionError, check_state_dict, load_weights, publish_directory, read_json,
                                strip_prefixes)
from tpa.convert.factor_fit import METHODS, fit_factors

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
T6_SOURCE_TYPES = ("mha", "gqa", "mqa")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# the T6Config fields a converted model takes from its source unchanged
CARRIED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "intermediate_size", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps",
                  "initializer_range", "attention_output_gate", "rope_partial_factor", "attention_head_norm",
                  "attention_head_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class ConvertOptions:
    """What ``tpa convert llama`` is asked for (see :func:`convert`)."""

    exact: bool = False
    k_rank: int | None = None
    v_rank: int | None = None
    q_rank: int | None = None  # None: TPA-KVonly (the source's query projection is kept)
    calibration: str | None = None  # a `tpa data prepare` folder; None: uniform random tokens
    calibration_tokens: int = 8192
    calibration_seq_len: int = 128
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    overwrite: bool = False  # replace an existing non-empty output directory


@dataclass
class Source:
    model: "torch.nn.Module"  # T6ForCausalLM of attention type mha/gqa/mqa, float32, eval mode
    kind: str  # "llama", "mistral" or "t6"
    path: Path
    dtype: torch.dtype  # dtype of the stored weights (the converted model is written in it)


@dataclass
class LayerReport:
    layer: int
    parts: dict = field(default_factory=dict)  # "k"/"v"/"q" -> {"method", "rel_error", "tried"}
    attention_output_rel_error: float | None = None


# ----------------------------------------------------------------------------------------------- sources


def _rope_theta_of_hf(raw: dict, unsupported: list[str]) -> float:
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        unsupported.append(f"RoPE scaling rope_type={rope_type!r} (only plain RoPE, rope_type 'default', is converted)")
    if raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        unsupported.append("partial rotary embeddings (partial_rotary_factor != 1)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def hf_llama_t6_config(raw: dict, where: Path):
    """The T6 ``mha``/``gqa``/``mqa`` configuration of a Llama/Mistral ``config.json``, or a
    :class:`ConversionError` naming every unsupported feature."""
    from tpa import T6Config

    archs = raw.get("architectures") or []
    if raw.get("model_type") not in HF_ARCHITECTURES.values() or any(a not in HF_ARCHITECTURES for a in archs):
        raise ConversionError(
            f"{where}: unsupported architecture {archs or raw.get('model_type')!r}; `tpa convert llama` reads "
            f"{', '.join(HF_ARCHITECTURES)} checkpoints and T6 {'/'.join(T6_SOURCE_TYPES)} directories")
    unsupported = []
    if raw.get("attention_bias"):
        unsupported.append("attention biases (attention_bias=true)")
    if raw.get("mlp_bias"):
        unsupported.append("MLP biases (mlp_bias=true)")
    if raw.get("hidden_act", "silu") != "silu":
        unsupported.append(f"activation {raw.get('hidden_act')!r} (only silu, i.e. SwiGLU)")
    window, max_pos = raw.get("sliding_window"), int(raw.get("max_position_embeddings", 2048))
    if window is not None and window < max_pos:
        unsupported.append(f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos})")
    theta = _rope_theta_of_hf(raw, unsupported)
    if unsupported:
        raise ConversionError(f"{where}: cannot convert a model with " + "; ".join(unsupported))
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    kind = "mha" if kv_heads == heads else ("mqa" if kv_heads == 1 else "gqa")
    eos = raw.get("eos_token_id")
    return T6Config(
        vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]), num_attention_heads=heads,
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads), intermediate_size=int(raw["intermediate_size"]),
        attention_type=kind, num_key_value_heads=kv_heads, rope_theta=theta, max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        initializer_range=float(raw.get("initializer_range", 0.02)), bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) and eos else eos, pad_token_id=raw.get("pad_token_id"))


def hf_llama_state_to_t6(state: dict[str, torch.Tensor], config, where: Path) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v and gate/up) an HF Llama state dict into T6 names; checks every name."""
    c, v, i = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    expected = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,), "lm_head.weight": (v, c)}
    per_layer = {"self_attn.q_proj": (q, c), "self_attn.k_proj": (kv, c), "self_attn.v_proj": (kv, c),
                 "self_attn.o_proj": (c, q), "mlp.gate_proj": (i, c), "mlp.up_proj": (i, c), "mlp.down_proj": (c, i),
                 "input_layernorm": (c,), "post_attention_layernorm": (c,)}
    for layer in range(config.num_hidden_layers):
        expected |= {f"model.layers.{layer}.{name}.weight": shape for name, shape in per_layer.items()}
    # rotary tables some older checkpoints stored: recomputed from rope_theta, so dropped
    state = {k: t for k, t in state.items() if not k.endswith("rotary_emb.inv_freq")}
    optional = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
    check_state_dict(state, expected, optional, what=f"Llama checkpoint {where}")
    out = {"model.embed_tokens.weight": state["model.embed_tokens.weight"], "model.norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        attn = [state[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
        out[f"{dst}self_attn.qkv_proj.weight"] = torch.cat(attn)
        out[f"{dst}self_attn.o_proj.weight"] = state[f"{src}self_attn.o_proj.weight"]
        out[f"{dst}mlp.gate_up_proj.weight"] = torch.cat([state[f"{src}mlp.gate_proj.weight"], state[f"{src}mlp.up_proj.weight"]])
        out[f"{dst}mlp.down_proj.weight"] = state[f"{src}mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst}{norm}.weight"] = state[f"{src}{norm}.weight"]
    return out


def _t6_model(config, state: dict[str, torch.Tensor], where: Path):
    """A float32 eval-mode T6ForCausalLM holding exactly ``state`` (every name checked)."""
    from tpa import T6ForCausalLM

    model = T6ForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
    check_state_dict(state, expected, optional, what=f"T6 checkpoint {where}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def load_source(src_dir: str | Path) -> Source:
    """Read a Llama/Mistral or T6 mha/gqa/mqa directory into a T6 model (see the module docstring)."""
    from tpa import T6Config

    src = Path(src_dir)
    if not src.is_dir():
        raise ConversionError(f"source directory not found: {src}")
    raw = read_json(src / "config.json")
    state = strip_prefixes(load_weights(src))
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ConversionError(f"{src}: expected floating-point tensors of one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    if raw.get("model_type") == T6Config.model_type:
        config = T6Config.from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
        if config.attention_type not in T6_SOURCE_TYPES:
            raise ConversionError(f"{src}: a T6 model of attention type {config.attention_type!r} cannot be converted; "
                                  f"the source must be one of {T6_SOURCE_TYPES}")
        return Source(_t6_model(config, state, src), "t6", src, dtype)
    config = hf_llama_t6_config(raw, src)
    t6_state = hf_llama_state_to_t6(state, config, src)
    return Source(_t6_model(config, t6_state, src), raw["model_type"], src, dtype)


# ----------------------------------------------------------------------------------------------- target


def resolve_ranks(source_config, options: ConvertOptions) -> tuple[int, int, int | None]:
    """``(k_rank, v_rank, q_rank or None)`` after the checks of the options against the source."""
    heads, groups = source_config.num_attention_heads, source_config.num_key_value_heads
    for name in ("k_rank", "v_rank", "q_rank"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConversionError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if options.exact:
        for name, exact in (("k_rank", groups), ("v_rank", groups), ("q_rank", heads)):
            value = getattr(options, name)
            if value is not None and value != exact:
                raise ConversionError(f"--exact: the exact {name.replace('_', '-')} of this source is {exact} "
                                      f"({'query heads' if name == 'q_rank' else 'key/value heads'}), got {value}")
        return groups, groups, (heads if options.q_rank is not None else None)
    if groups == 1:
        raise ConversionError("the source has one key/value head (MQA): its exact rank is 1 and there is no smaller "
                              "rank to compress to; use --exact")
    k_rank = options.k_rank if options.k_rank is not None else min(2, groups - 1)
    v_rank = options.v_rank if options.v_rank is not None else min(2, groups - 1)
    for name, value in (("k-rank", k_rank), ("v-rank", v_rank)):
        if value > groups:
            raise ConversionError(f"--{name} {value} is above the exact rank {groups} (the source's key/value heads)")
        if value == groups:
            raise ConversionError(f"--{name} {value} equals the exact rank {groups}: use --exact for that model "
                                  "(contextual factors at that rank would cache more than the source)")
    if options.q_rank is not None and options.q_rank > heads:
        raise ConversionError(f"--q-rank {options.q_rank} is above the exact rank {heads} (the source's query heads)")
    return k_rank, v_rank, options.q_rank


def target_config(source_config, k_rank: int, v_rank: int, q_rank: int | None, exact: bool):
    from tpa import T6Config

    values = {name: getattr(source_config, name) for name in CARRIED_FIELDS}
    return T6Config(**values, attention_type="tpa" if q_rank is not None else "tpa_kvonly",
                    q_rank=q_rank if q_rank is not None else 1, k_rank=k_rank, v_rank=v_rank,
                    tpa_contextual_a=not exact)


def _source_projections(attn) -> dict[str, torch.Tensor]:
    """``q [H*D, C]``, ``k``, ``v [G*D, C]`` (and ``gate``) of a T6 MultiHeadAttention, float64."""
    h, g, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv_proj.weight.detach().double().split([h * d, g * d, g * d])
    out = {"q": q, "k": k, "v": v}
    if attn.gate_proj is not None:
        out["gate"] = attn.gate_proj.weight.detach().double()
    return out


def _group_head_factor(rank: int, heads: int) -> torch.Tensor:
    """``[rank, heads]``: ``rank`` where head h belongs to group r (h // (heads/rank) == r), else 0."""
    group = torch.arange(heads) // (heads // rank)
    return (group[None, :] == torch.arange(rank)[:, None]).double() * rank


def exact_attention_weights(attn, factorize_q: bool) -> tuple[dict, dict]:
    """Token-dependent weight segments and head-factor parameters of the exact TPA layer."""
    proj = _source_projections(attn)
    h, g = attn.num_heads, attn.num_kv_heads
    segments = {"b_k": proj["k"], "b_v": proj["v"]}
    params = {"a_k": _group_head_factor(g, h), "a_v": _group_head_factor(g, h)}
    if factorize_q:
        segments["b_q"], params["a_q"] = proj["q"], _group_head_factor(h, h)
    else:
        segments["q"] = proj["q"]
    if "gate" in proj:
        segments["gate"] = proj["gate"]
    return segments, params


def fitted_attention_weights(attn, ranks: dict[str, int], x_fit: torch.Tensor, x_held: torch.Tensor,
                             methods: tuple[str, ...]) -> tuple[dict, dict]:
    """Contextual factor weights fitted per part (``ranks``: part -> rank) and their report."""
    proj = _source_projections(attn)
    h, g, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    segments = {} if "q" in ranks else {"q": proj["q"]}
    report = {}
    for part, rank in ranks.items():
        groups = h if part == "q" else g
        weight = proj[part].reshape(groups, d, -1).repeat_interleave(h // groups, dim=0)  # [H, D, C]
        fit, tried = fit_factors(weight, x_fit, x_held, rank, methods)
        segments[f"a_{part}"], segments[f"b_{part}"] = fit.w_a.reshape(rank * h, -1), fit.w_b.reshape(rank * d, -1)
        report[part] = {"method": fit.method, "rel_error": fit.rel_error, "tried": tried}
    if "gate" in proj:
        segments["gate"] = proj["gate"]
    return segments, report


def set_tpa_layer(layer, segments: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Fill a TensorProductAttention's fused ``proj`` (in its segment order), head-factor parameters and
    ``o_proj`` (``segments['o']``)."""
    with torch.no_grad():
        pieces = [segments[name] for name, _ in layer.segments]
        layer.proj.weight.copy_(torch.cat(pieces))
        for name, value in params.items():
            getattr(layer, name).copy_(value)
        layer.o_proj.weight.copy_(segments["o"])


# ----------------------------------------------------------------------------------------------- convert


def _verify_hf_source(source: Source, probe: torch.Tensor) -> float | None:
    """Logits of the T6 form of an HF source against transformers' own model (float32)."""
    if source.kind == "t6":
        return None
    from transformers import AutoModelForCausalLM

    from tpa.convert.calibrate import check_same_logits

    hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    # float32 logits of two implementations agree to ~1e-6 relative; a wrong layout is off by O(1)
    return check_same_logits(source.model, hf, probe, "the source read into T6 and transformers' model", 1e-4)


def build_target(source: Source, options: ConvertOptions, sequences: torch.Tensor):
    """The converted model (float32, eval) and its per-layer reports."""
    from tpa import T6ForCausalLM
    from tpa.convert.calibrate import attention_inputs, attention_output_error, split_fit_held

    src_cfg = source.model.config
    k_rank, v_rank, q_rank = resolve_ranks(src_cfg, options)
    config = target_config(src_cfg, k_rank, v_rank, q_rank, options.exact)
    torch.manual_seed(options.seed)
    target = T6ForCausalLM(config).eval()
    carried = {k: v for k, v in source.model.state_dict().items() if ".self_attn." not in k}
    missing, unexpected = target.load_state_dict(carried, strict=False)
    assert not unexpected and all(".self_attn." in k for k in missing), (missing, unexpected)
    fit_seqs, held_seqs = split_fit_held(sequences)
    inputs_fit = [] if options.exact else attention_inputs(source.model, fit_seqs)
    inputs_held = attention_inputs(source.model, held_seqs)
    ranks = {"k": k_rank, "v": v_rank, **({"q": q_rank} if q_rank is not None else {})}
    reports = []
    for i, (src_layer, dst_layer) in enumerate(zip(source.model.model.layers, target.model.layers)):
        src_attn, dst_attn = src_layer.self_attn, dst_layer.self_attn
        report = LayerReport(layer=i)
        if options.exact:
            segments, params = exact_attention_weights(src_attn, q_rank is not None)
        else:
            x_fit, x_held = inputs_fit[i].flatten(0, 1), inputs_held[i].flatten(0, 1)
            segments, report.parts = fitted_attention_weights(src_attn, ranks, x_fit, x_held, options.methods)
            params = {}
        segments["o"] = src_attn.o_proj.weight.detach()
        set_tpa_layer(dst_attn, segments, params)
        if src_attn.head_norm is not None:  # the per-head output norm acts on the same head outputs
            with torch.no_grad():
                dst_attn.head_norm.weight.copy_(src_attn.head_norm.weight)
        report.attention_output_rel_error = attention_output_error(src_attn, dst_attn, inputs_held[i],
                                                                   source.model.model.rotary)
        reports.append(report)
    return target, reports, held_seqs


def _summary(source: Source, target, options: ConvertOptions, reports: list[LayerReport], held: torch.Tensor,
             checks: dict) -> dict:
    from tpa.convert.calibrate import mean_loss

    src_cfg, cfg = source.model.config, target.config
    return {
        "source": str(source.path), "source_kind": source.kind, "source_attention_type": src_cfg.attention_type,
        "mode": "exact" if options.exact else "fitted", "attention_type": cfg.attention_type,
        "k_rank": cfg.k_rank, "v_rank": cfg.v_rank, "q_rank": cfg.q_rank if cfg.attention_type == "tpa" else None,
        "kv_cache_per_token_per_layer": {"source": src_cfg.kv_cache_elements_per_token(),
                                         "converted": cfg.kv_cache_elements_per_token()},
        "calibration": options.calibration or "uniform random tokens",
        "heldout_sequences": int(held.shape[0]), "heldout_seq_len": int(held.shape[1]),
        "heldout_loss": {"source": mean_loss(source.model, held), "converted": mean_loss(target, held)},
        "checks": checks, "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
        "layers": [asdict(r) for r in reports],
    }


def convert(src_dir: str | Path, out_dir: str | Path, options: ConvertOptions | None = None) -> dict:
    """Convert ``src_dir`` into a TPA model written atomically to ``out_dir``; return the report.

    The report (also ``out_dir/conversion.json``) holds the ranks, the cache per token of source and
    result, per layer the fit method and relative errors of K, V (Q) and of the attention output on
    held-out calibration tokens, the held-out loss of both models and the verification results.

    Raises:
        ConversionError: unsupported source, bad ranks, missing files, failed verification (nothing written).
    """
    from tpa import T6ForCausalLM
    from tpa.convert.calibrate import calibration_sequences, check_same_logits, copy_tokenizer

    options = options or ConvertOptions()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise ConversionError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if options.calibration_tokens < 1 or options.calibration_seq_len < 1:
        raise ConversionError(f"--calibration-tokens and --calibration-seq-len must be >= 1, got "
                              f"{options.calibration_tokens} and {options.calibration_seq_len}")
    if not set(options.methods) <= set(METHODS) or not options.methods:
        raise ConversionError(f"fit methods must be a non-empty subset of {METHODS}, got {options.methods}")
    source = load_source(src_dir)
    cfg = source.model.config
    seq_len = min(options.calibration_seq_len, cfg.max_position_embeddings)
    sequences = calibration_sequences(options.calibration, cfg.vocab_size, options.calibration_tokens, seq_len,
                                      options.seed)
    probe = sequences[-2:, : min(seq_len, 64)]
    checks = {"source_vs_transformers_rel": _verify_hf_source(source, probe)}
    target, reports, held = build_target(source, options, sequences)
    if options.exact:  # float32: two computations of the same function (float64 tests hold it to 1e-10)
        checks["converted_vs_source_rel"] = check_same_logits(target, source.model, probe, "converted and source logits",
                                                              1e-4)
    report = _summary(source, target, options, reports, held, checks)

    with publish_directory(out, overwrite=options.overwrite) as tmp:
        target.to(source.dtype).save_pretrained(tmp)
        target.float()
        reloaded = T6ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        tol = 1e-6 if source.dtype == torch.float32 else 1e-2
        report["checks"]["reloaded_vs_converted_rel"] = check_same_logits(reloaded, target, probe,
                                                                          "the written and the converted model", tol)
        report["tokenizer_files"] = copy_tokenizer(source.path, tmp, TOKENIZER_FILES)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    """A short human-readable table of a conversion report."""
    cache = report["kv_cache_per_token_per_layer"]
    lines = [f"{report['source']} ({report['source_kind']} {report['source_attention_type']}) -> "
             f"{report['attention_type']} ({report['mode']}), ranks k={report['k_rank']} v={report['v_rank']}"
             + (f" q={report['q_rank']}" if report["q_rank"] else ""),
             f"KV cache per token per layer: {cache['source']} -> {cache['converted']} "
             f"({cache['converted'] / cache['source']:.1%})",
             f"held-out loss on {report['calibration']}: source {report['heldout_loss']['source']:.4f}, "
             f"converted {report['heldout_loss']['converted']:.4f}",
             "layer  " + "  ".join(f"{p}: method rel.err" for p in ("q", "k", "v") if p in report["layers"][0]["parts"])
             + "  attention-output rel.err"]
    for layer in report["layers"]:
        cols = [f"{p}: {layer['parts'][p]['method']:>4} {layer['parts'][p]['rel_error']:.4f}"
                for p in ("q", "k", "v") if p in layer["parts"]]
        lines.append(f"{layer['layer']:>5}  " + "  ".join(cols) + f"  {layer['attention_output_rel_error']:.3g}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command


def _run(args) -> int:
    options = ConvertOptions(exact=args.exact, k_rank=args.k_rank, v_rank=args.v_rank, q_rank=args.q_rank,
                             calibration=args.calibration, calibration_tokens=args.calibration_tokens,
                             calibration_seq_len=args.calibration_seq_len,
                             methods=tuple(m.strip() for m in args.fit_methods.split(",") if m.strip()), seed=args.seed,
                             overwrite=args.overwrite)
    try:
        report = convert(args.src, args.out, options)
    except ConversionError as err:
        print(f"tpa convert llama: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {args.out} (report in {args.out}/conversion.json)")
    return 0
