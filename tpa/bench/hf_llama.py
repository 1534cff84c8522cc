"""transformers' own ``LlamaForCausalLM`` as a baseline of ``tpa bench generate``.

The model a user already has, matched to a T6 config of the preset: the same width, depth, KV heads,
head size, MLP width, vocabulary, RoPE base and norm epsilon, random weights. Type ``llama`` is
matched to the preset's ``gqa``, ``llama-mha`` to its ``mha`` and ``llama-mqa`` to its ``mqa``
(:data:`LLAMA_TYPES`). Its query heads are ``hidden_size // head_dim`` (transformers' config wants
``hidden_size`` divisible by the head count; T6's ``small`` GQA has 22 heads of 64, which becomes 12
here): the cached bytes per token, and so the KV traffic of a decode step, are those of the T6 model.
"""

from __future__ import annotations

LLAMA_TYPE = "llama"
LLAMA_TYPES = {LLAMA_TYPE: "gqa", "llama-mha": "mha", "llama-mqa": "mqa"}  # type -> the T6 type it is matched to


def llama_heads(hidden_size: int, head_dim: int, kv_heads: int, max_heads: int) -> int:
    """Query heads of the matched Llama: ``hidden_size // head_dim`` when that divides evenly into
    KV groups, else the largest head count dividing ``hidden_size`` and ``kv_heads`` divides."""
    if hidden_size % head_dim == 0 and (hidden_size // head_dim) % kv_heads == 0:
        return hidden_size // head_dim
    for heads in range(max(max_heads, kv_heads), 0, -1):
        if hidden_size % heads == 0 and heads % kv_heads == 0:
            return heads
    raise ValueError(f"no head count divides hidden_size={hidden_size} into groups of kv_heads={kv_heads}")


def llama_config_like(cfg):
    """A ``LlamaConfig`` matched to the T6 config ``cfg`` (see the module docstring)."""
    from transformers import LlamaConfig

    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    heads = llama_heads(cfg.hidden_size, cfg.head_dim, kv_heads, cfg.num_attention_heads)
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa",
    )


def kv_bytes_per_token(llama_cfg, itemsize: int) -> int:
    """Cached bytes per token of all layers: ``2 G D`` numbers per layer."""
    return 2 * llama_cfg.num_key_value_heads * llama_cfg.head_dim * llama_cfg.num_hidden_layers * itemsize


def llama_parameters(llama_cfg) -> int:
    """Parameters of ``LlamaForCausalLM(llama_cfg)``, counted on the ``meta`` device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_cfg)
    return sum(p.numel() for p in model.parameters())


def build_llama(llama_cfg, device, dtype):
    """``LlamaForCausalLM`` with random weights (seed 0) in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_cfg)
    return model.to(dtype).eval()


def llama_cache(model, capacity: int, static: bool):
    """transformers' ``StaticCache`` of ``capacity`` tokens (``cache_implementation="static"``), or a
    ``DynamicCache``."""
    from transformers import DynamicCache, StaticCache

    if static:
        return StaticCache(config=model.config, max_cache_len=capacity)
    return DynamicCache(config=model.config)


def cache_bytes(cache) -> int:
    """Bytes the tensors of a transformers cache hold."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total
