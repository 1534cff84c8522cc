"""Which model of the paper's code (github tensorgi/T6) a checkpoint holds, and the tensors it must have.

The paper's training script saves ``config.json`` (its ``GPTConfig`` fields, ``model_type "gpt2"``)
and ``pytorch_model.bin``. Six model files are recognised, by the layer-0 attention tensors and the
config:

========================  ==========================================  ==========================
official file             layer-0 attention tensors                   our ``attention_type``
========================  ==========================================  ==========================
``model/T6.py``           ``c_qkv.W_A_q``, ``c_qkv.W_B_q`` ...        ``tpa``
``model/T6_kvonly.py``    ``c_qkv.c_q``, ``c_qkv.W_A_k`` ...          ``tpa_kvonly``
``model/llama-mha.py``    ``c_q, c_k, c_v`` (no ``group_size``)       ``mha`` (head size C / H)
``model/llama-gqa.py``    ``c_q, c_k, c_v`` and ``group_size``        ``gqa``, or ``mqa`` when
                                                                      ``group_size == n_head``
``model/llama-mla.py``    ``q_a_proj``, ``kv_a_proj_with_mqa`` ...    ``mla``
========================  ==========================================  ==========================

Values missing from ``config.json`` take the official ``GPTConfig`` defaults of that file (the
training script never writes MLA's ``q_lora_rank``/``kv_lora_rank``/``qk_rope_head_dim``/
``v_head_dim``, so those runs used 512/256/32/64); the tensor shapes are then checked against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpa.convert.common import ConversionError

KINDS = ("T6", "T6_kvonly", "llama-mha", "llama-gqa", "llama-mqa", "llama-mla")
ATTENTION_TYPE = {"T6": "tpa", "T6_kvonly": "tpa_kvonly", "llama-mha": "mha", "llama-gqa": "gqa",
                  "llama-mqa": "mqa", "llama-mla": "mla"}
# GPTConfig defaults per official file, for fields a saved config may lack
_DEFAULTS = {
    "T6": dict(head_dim=64, rank=2, q_rank=6),
    "T6_kvonly": dict(head_dim=64, rank=2, q_rank=12),
    "llama-mha": dict(),
    "llama-gqa": dict(head_dim=64, group_size=4),
    "llama-mla": dict(head_dim=64, q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32, v_head_dim=64),
}
# config fields of official variants we do not convert
_UNSUPPORTED_FIELDS = {"rope_decay_base": "RoPE with decay (the *_decay model files)"}
_LAYER0 = "transformer.h.0.attn."


@dataclass(frozen=True)
class OfficialModel:
    """The shapes of one official checkpoint.

    Attributes:
        kind: one of :data:`KINDS`. n_layer, n_head, n_embd, vocab_size, block_size: as in GPTConfig.
        head_dim: D (for ``llama-mha`` always ``n_embd // n_head``; for MLA the non-RoPE part).
        rank, q_rank: TPA ranks (one ``rank`` for K and V). n_kv_head: K/V heads of MHA/GQA/MQA.
        intermediate_size: SwiGLU width ``floor(8/3 * n_embd)``.
        using_groupnorm: per-head RMSNorm (with gain, eps 1e-5) of the attention output.
        rope_partial_factor: fraction of each query/key feature vector RoPE rotates (1: all).
        q_lora_rank, kv_lora_rank, qk_rope_head_dim, v_head_dim: MLA sizes.
    """

    kind: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    head_dim: int
    intermediate_size: int
    rank: int = 1
    q_rank: int = 1
    n_kv_head: int = 1
    using_groupnorm: bool = False
    rope_partial_factor: float = 1.0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def attention_type(self) -> str:
        return ATTENTION_TYPE[self.kind]

    @property
    def rotary_dim(self) -> int:
        """Features RoPE rotates per query/key vector (MLA: the decoupled RoPE part)."""
        if self.kind == "llama-mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rope_partial_factor) // 2 * 2


def detect_kind(config: dict, keys) -> str:
    """The official model file a checkpoint comes from (see the module docstring).

    Raises:
        ConversionError: the keys match no official model, or the config is not an official one.
    """
    keys = set(keys)

    def has(*names: str) -> bool:
        return all(_LAYER0 + n + ".weight" in keys for n in names)

    if has("c_qkv.W_A_q", "c_qkv.W_B_q"):
        return "T6"
    if has("c_qkv.c_q", "c_qkv.W_A_k"):
        return "T6_kvonly"
    if has("q_a_proj", "kv_a_proj_with_mqa"):
        return "llama-mla"
    if has("c_q", "c_k", "c_v"):
        if "group_size" not in config:
            return "llama-mha"
        n_head = config.get("n_head")
        return "llama-mqa" if config["group_size"] == n_head else "llama-gqa"
    found = sorted(k[len(_LAYER0):] for k in keys if k.startswith(_LAYER0))
    raise ConversionError(
        "not a checkpoint of a known official model (T6, T6_kvonly, llama-mha, llama-gqa, llama-mla): "
        f"layer-0 attention tensors are {found or 'absent'}"
        + ("" if any(k.startswith("transformer.h.") for k in keys) else " (no 'transformer.h.*' tensors at all)")
    )


def _int(config: dict, name: str, default=None) -> int:
    value = config.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConversionError(f"config.json: {name} must be an integer >= 1, got {value!r}")
    return value


def read_spec(config: dict, keys) -> OfficialModel:
    """Parse an official ``config.json`` (already loaded) for the checkpoint holding ``keys``.

    Raises:
        ConversionError: not an official config, an unsupported official variant, or bad values.
    """
    if config.get("model_type") == "t6":
        raise ConversionError("this is already a T6 directory (model_type 't6'); load it with T6ForCausalLM")
    missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in config]
    if missing:
        raise ConversionError(f"config.json is not a config of the paper's code: it lacks {missing} "
                              f"(model_type {config.get('model_type')!r})")
    for field, what in _UNSUPPORTED_FIELDS.items():
        if field in config:
            raise ConversionError(f"config.json has {field!r}: {what} is not supported by tpa convert official")
    kind = detect_kind(config, keys)
    defaults = _DEFAULTS["llama-gqa" if kind == "llama-mqa" else kind]

    def get(name: str) -> int:
        return _int(config, name, defaults.get(name))

    n_layer, n_head, n_embd = get("n_layer"), get("n_head"), get("n_embd")
    common = dict(kind=kind, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  vocab_size=_int(config, "vocab_size", 50304), block_size=_int(config, "block_size", 1024),
                  intermediate_size=math.floor(8 / 3 * n_embd),
                  using_groupnorm=bool(config.get("using_groupnorm", False)))
    partial = config.get("rope_partial_factor", 1.0)
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise ConversionError(f"config.json: rope_partial_factor must be a number in (0, 1], got {partial!r}")
    if kind in ("T6", "T6_kvonly"):
        spec = OfficialModel(head_dim=get("head_dim"), rank=get("rank"),
                             q_rank=get("q_rank"), rope_partial_factor=float(partial), **common)
    elif kind == "llama-mha":
        if n_embd % n_head:
            raise ConversionError(f"llama-mha needs n_head dividing n_embd, got n_embd={n_embd}, n_head={n_head}")
        spec = OfficialModel(head_dim=n_embd // n_head, n_kv_head=n_head, rope_partial_factor=float(partial), **common)
    elif kind in ("llama-gqa", "llama-mqa"):
        group = get("group_size")
        if n_head % group:
            raise ConversionError(f"llama-gqa needs group_size dividing n_head, got n_head={n_head}, group_size={group}")
        spec = OfficialModel(head_dim=get("head_dim"), n_kv_head=n_head // group,
                             rope_partial_factor=float(partial), **common)
    else:
        if partial != 1:
            raise ConversionError("config.json: rope_partial_factor is not an option of llama-mla")
        spec = OfficialModel(head_dim=get("head_dim"), q_lora_rank=get("q_lora_rank"),
                             kv_lora_rank=get("kv_lora_rank"), qk_rope_head_dim=get("qk_rope_head_dim"),
                             v_head_dim=get("v_head_dim"), **common)
        if spec.using_groupnorm and spec.v_head_dim != spec.head_dim + spec.qk_rope_head_dim:
            raise ConversionError("llama-mla with using_groupnorm norms the value heads with head_dim + "
                                  "qk_rope_head_dim gains, which only runs when v_head_dim equals that sum")
    if spec.rotary_dim < 2 or spec.rotary_dim % 2:
        raise ConversionError(f"RoPE would rotate {spec.rotary_dim} features per head; it needs an even number >= 2")
    return spec


def expected_shapes(spec: OfficialModel) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the official model of ``spec`` saves (both tied embeddings listed)."""
    c, h, d, f = spec.n_embd, spec.n_head, spec.head_dim, spec.intermediate_size
    shapes = {"transformer.wte.weight": (spec.vocab_size, c), "lm_head.weight": (spec.vocab_size, c)}
    for i in range(spec.n_layer):
        p = f"transformer.h.{i}."
        shapes[p + "mlp.c_fc1.weight"] = (f, c)
        shapes[p + "mlp.c_fc2.weight"] = (f, c)
        shapes[p + "mlp.c_proj.weight"] = (c, f)
        a = p + "attn."
        value_dim = d
        if spec.kind in ("T6", "T6_kvonly"):
            if spec.kind == "T6":
                shapes[a + "c_qkv.W_A_q.weight"] = (h * spec.q_rank, c)
                shapes[a + "c_qkv.W_B_q.weight"] = (spec.q_rank * d, c)
            else:
                shapes[a + "c_qkv.c_q.weight"] = (h * d, c)
            for kind in ("k", "v"):
                shapes[a + f"c_qkv.W_A_{kind}.weight"] = (h * spec.rank, c)
                shapes[a + f"c_qkv.W_B_{kind}.weight"] = (spec.rank * d, c)
        elif spec.kind == "llama-mla":
            r, e = spec.qk_rope_head_dim, spec.v_head_dim
            shapes[a + "q_a_proj.weight"] = (spec.q_lora_rank, c)
            shapes[a + "q_a_layernorm.weight"] = (spec.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (h * (d + r), spec.q_lora_rank)
            shapes[a + "kv_a_proj_with_mqa.weight"] = (spec.kv_lora_rank + r, c)
            shapes[a + "kv_a_layernorm.weight"] = (spec.kv_lora_rank,)
            shapes[a + "kv_b_proj.weight"] = (h * (d + e), spec.kv_lora_rank)
            value_dim = e
        else:
            shapes[a + "c_q.weight"] = (h * d, c)
            shapes[a + "c_k.weight"] = (spec.n_kv_head * d, c)
            shapes[a + "c_v.weight"] = (spec.n_kv_head * d, c)
        shapes[a + "c_proj.weight"] = (c, h * value_dim)
        if spec.using_groupnorm:
            shapes[a + "subln.weight"] = (value_dim,)
    return shapes
