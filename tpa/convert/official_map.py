"""Official (github tensorgi/T6) tensors -> ``T6ForCausalLM`` tensors and configuration.

What the mapping absorbs (see :mod:`tpa.convert.official_reference` for the official conventions):

- RoPE direction: the official code rotates by minus the angle, we rotate by plus. With ``P`` the swap
  of the two rotated halves, ``ours(P x) = P official(x)`` and ``P`` keeps dot products, so swapping
  the halves of every rotated weight block (TPA's ``B_q``/``B_k`` rows per rank, the KVonly/MHA/GQA
  query and key rows per head, MLA's RoPE rows) turns one model into the other exactly.
- Head factors: official ``W_A`` rows are ordered ``h*R + r``, ours ``r*H + h``.
- Norms without gain: our block and final norms get gains of one and ``rms_norm_eps`` the float32
  machine epsilon (the official models are trained with float32 residuals under autocast).
- SwiGLU ``c_fc1``/``c_fc2`` become the two halves of ``gate_up_proj``, ``intermediate_size`` as given.
"""

from __future__ import annotations

import torch

from tpa.convert.official_spec import OfficialModel
from tpa.models.t6.configuration_t6 import T6Config


def t6_config(spec: OfficialModel, tied: bool) -> T6Config:
    """Our configuration computing what the official model of ``spec`` computes."""
    mla = spec.kind == "llama-mla"
    values = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.n_embd, num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head, head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
        attention_type=spec.attention_type, q_rank=spec.q_rank, k_rank=spec.rank, v_rank=spec.rank,
        num_key_value_heads=spec.n_kv_head if spec.kind in ("llama-mha", "llama-gqa", "llama-mqa") else None,
        rope_theta=10000.0, max_position_embeddings=spec.block_size, tie_word_embeddings=tied,
        rms_norm_eps=torch.finfo(torch.float32).eps, rope_partial_factor=spec.rope_partial_factor,
        attention_head_norm=spec.using_groupnorm, attention_head_norm_eps=1e-5,
    )
    if mla:
        values.update(kv_lora_rank=spec.kv_lora_rank, q_lora_rank=spec.q_lora_rank,
                      qk_rope_head_dim=spec.qk_rope_head_dim, v_head_dim=spec.v_head_dim,
                      mla_latent_norm=True, mla_latent_norm_eps=1e-6)
    return T6Config(**values)


def swap_rotated_halves(weight: torch.Tensor, block: int, rotary_dim: int) -> torch.Tensor:
    """Rows of ``weight [n * block, C]`` in ``block``-row feature vectors; in each, the first
    ``rotary_dim/2`` rows trade places with the next ``rotary_dim/2`` (the RoPE direction flip)."""
    rows = weight.reshape(-1, block, weight.shape[-1])
    half = rotary_dim // 2
    return torch.cat([rows[:, half:rotary_dim], rows[:, :half], rows[:, rotary_dim:]], dim=1).reshape(weight.shape)


def head_major_to_rank_major(weight: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """Head-factor rows ``h*R + r`` (official) -> ``r*H + h`` (ours)."""
    return weight.reshape(heads, rank, weight.shape[-1]).transpose(0, 1).reshape(weight.shape)


def _attention(spec: OfficialModel, w: dict, a: str, segments: list[str] | None) -> dict[str, torch.Tensor]:
    """Our ``self_attn.*`` tensors of one layer from the official ``attn.*`` tensors (prefix ``a``)."""
    h, d, rot = spec.n_head, spec.head_dim, spec.rotary_dim
    out = {"o_proj.weight": w[a + "c_proj.weight"]}
    if spec.using_groupnorm:
        out["head_norm.weight"] = w[a + "subln.weight"]
    if spec.kind in ("T6", "T6_kvonly"):
        parts = {"q": swap_rotated_halves(w[a + "c_qkv.c_q.weight"], d, rot)} if spec.kind == "T6_kvonly" else {}
        ranks = {"q": spec.q_rank, "k": spec.rank, "v": spec.rank}
        for kind in ("q", "k", "v") if spec.kind == "T6" else ("k", "v"):
            parts[f"a_{kind}"] = head_major_to_rank_major(w[a + f"c_qkv.W_A_{kind}.weight"], h, ranks[kind])
            b = w[a + f"c_qkv.W_B_{kind}.weight"]
            parts[f"b_{kind}"] = b if kind == "v" else swap_rotated_halves(b, d, rot)
        out["proj.weight"] = torch.cat([parts[name] for name in segments], dim=0)
    elif spec.kind == "llama-mla":
        r = spec.qk_rope_head_dim
        q_b = w[a + "q_b_proj.weight"].reshape(h, d + r, -1)
        q_b = torch.cat([q_b[:, :d], swap_rotated_halves(q_b[:, d:].reshape(h * r, -1), r, r).reshape(h, r, -1)], 1)
        kv_a = w[a + "kv_a_proj_with_mqa.weight"]
        out.update({
            "q_a_proj.weight": w[a + "q_a_proj.weight"], "q_a_norm.weight": w[a + "q_a_layernorm.weight"],
            "q_b_proj.weight": q_b.reshape(h * (d + r), -1),
            "kv_a_proj.weight": torch.cat([kv_a[: spec.kv_lora_rank], swap_rotated_halves(kv_a[spec.kv_lora_rank:], r, r)]),
            "kv_a_norm.weight": w[a + "kv_a_layernorm.weight"], "kv_b_proj.weight": w[a + "kv_b_proj.weight"],
        })
    else:
        out["qkv_proj.weight"] = torch.cat([swap_rotated_halves(w[a + "c_q.weight"], d, rot),
                                            swap_rotated_halves(w[a + "c_k.weight"], d, rot), w[a + "c_v.weight"]])
    return out


def map_weights(spec: OfficialModel, weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Our state dict for ``model`` (a ``T6ForCausalLM`` built from :func:`t6_config`) from the checked
    official ``weights``."""
    w = weights
    embed = w.get("transformer.wte.weight", w.get("lm_head.weight"))
    out = {"model.embed_tokens.weight": embed, "lm_head.weight": w.get("lm_head.weight", embed),
           "model.norm.weight": torch.ones(spec.n_embd, dtype=embed.dtype)}
    for i, layer in enumerate(model.model.layers):
        p, ours = f"transformer.h.{i}.", f"model.layers.{i}."
        segments = [name for name, _ in getattr(layer.self_attn, "segments", [])]
        for name, tensor in _attention(spec, w, p + "attn.", segments).items():
            out[ours + "self_attn." + name] = tensor
        out[ours + "mlp.gate_up_proj.weight"] = torch.cat([w[p + "mlp.c_fc1.weight"], w[p + "mlp.c_fc2.weight"]])
        out[ours + "mlp.down_proj.weight"] = w[p + "mlp.c_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[ours + norm + ".weight"] = torch.ones(spec.n_embd, dtype=embed.dtype)
    return out
