"""T6 configuration: a LLaMA-style model whose attention is chosen by ``attention_type``.

Presets follow the paper: layers and width from Table 9, head_dim 64, head counts per attention type
from Table 10 (so every type has about MHA's attention parameters), R_q=6 and R_k=R_v=2 for TPA and
TPA-KVonly, 2 KV heads for GQA, d_c and d'_c from Table 10 and d_R=32 for MLA. ``tiny`` and ``mini``
are CPU-sized presets whose head counts are derived by the same parameter matching.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from tpa.layers.tpa import check_cache_head_multiple, decode_kernel_blockers
from tpa.models.presets import (  # noqa: F401  (re-exported: the names T6Config is built from)
    _SIZES, _TABLE10_HEADS, ATTENTION_TYPES, PRESETS, _swiglu_width, attention_parameters, matched_heads,
)


class T6Config(PreTrainedConfig):
    """Configuration of :class:`tpa.T6ForCausalLM`.

    Args:
        vocab_size, hidden_size, num_hidden_layers, intermediate_size, max_position_embeddings,
        rms_norm_eps, rope_theta, tie_word_embeddings, initializer_range: as in LLaMA.
        num_attention_heads: H. head_dim: D (64 in the paper).
        attention_type: one of ``tpa, tpa_kvonly, mha, gqa, mqa, mla``.
        q_rank, k_rank, v_rank: TPA ranks (R_q unused by TPA-KVonly).
        num_key_value_heads: G for GQA (MQA forces 1, MHA forces H).
        kv_lora_rank, q_lora_rank, qk_rope_head_dim: MLA's d_c, d'_c and d_R.
        tpa_contextual_a, tpa_contextual_b, tpa_share_kv_b, tpa_head_activation, tpa_order, tpa_c_dim:
            TPA variants (see :mod:`tpa.layers.tpa`).
        tpa_cache_head_multiple: M >= 1 (TPA and TPA-KVonly with the plain factor cache): the cached
            head factors ``a_k``/``a_v`` are stored padded with zeros to ``ceil(H/M)*M`` heads and the
            FlashTPA decode kernel reads the padded rows with plain loads (``DecodeLaunchOptions(
            a_head_pad=M, a_dot=False)``; unpadded caches take the default one-hot path, ``a_dot``).
            Costs memory: those parts grow from ``R*H`` to ``R*ceil(H/M)*M`` numbers per token, at
            ``small``'s H=34 with R_k=R_v=2 +6% of the whole cache with M=8 (416 instead of 392 per token
            per layer), +14% with M=16 (448). Buys kernel time where the rows of H heads are not 16
            bytes long: at H=34 in CUDA-graph replay (H200, bf16, 2026-12-02, BENCHMARKS.md "the
            head-factor rows aligned") B=16, 512K tokens, ranks (16,1,1) 1015 -> 920 us (M=8), (6,2,2)
            2197 -> 2081 us; ``generate()`` of ``small`` at a 32K prompt 4,422 -> 4,543 tokens/s at
            B=8, 961 -> 1,037 at B=1.
            1 (default): unpadded. Readers other than the kernel always see ``[R, H]``.
        attention_output_gate: sigmoid output gate on the attention output (any attention type).
        attn_impl: ``"sdpa"`` (materialise Q, K, V and call SDPA) or ``"factors"`` (TPA only, Algorithm 1).
        decode_impl: ``"auto"`` (the FlashTPA kernel for TPA, TPA-KVonly, GQA and MQA decoding on CUDA; see
            ``tpa.ops.grouped_decode``), ``"kernel"`` (also on CPU, under Triton's interpreter) or ``"reference"``.
        mla_latent_norm, mla_absorb: RMSNorm on MLA's latents; latent-space attention with a cache.
        mla_latent_norm_eps: epsilon of MLA's latent norms (default ``rms_norm_eps``).
        v_head_dim: MLA's value head size E (default ``head_dim``).
        rope_partial_factor: RoPE rotates only the first ``int(D * factor)`` (rounded down to even)
            features of each query/key feature vector (TPA's ``b_q``/``b_k``, the KVonly/MHA/GQA/MQA
            query and key heads); 1 rotates all. Not for MLA (its RoPE part is ``qk_rope_head_dim``) or
            third-order TPA.
        attention_head_norm, attention_head_norm_eps: an RMSNorm with gain over each head's attention
            output before the output projection (the paper's code's ``using_groupnorm``), any type.

    The block and final norms are ``RMSNorm`` with gain and epsilon ``rms_norm_eps``; a model whose
    norms have no gain (the paper's code) is expressed with gains of one.
    """

    model_type = "t6"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 34,
        head_dim: int = 64,
        intermediate_size: int | None = None,
        attention_type: str = "tpa",
        q_rank: int = 6,
        k_rank: int = 2,
        v_rank: int = 2,
        num_key_value_heads: int | None = None,
        kv_lora_rank: int = 256,
        q_lora_rank: int = 512,
        qk_rope_head_dim: int = 32,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        tie_word_embeddings: bool = True,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tpa_contextual_a: bool = True,
        tpa_contextual_b: bool = True,
        tpa_share_kv_b: bool = False,
        tpa_head_activation: str = "none",
        tpa_order: int = 2,
        tpa_c_dim: int = 1,
        tpa_cache_head_multiple: int = 1,
        attention_output_gate: bool = False,
        attn_impl: str = "sdpa",
        decode_impl: str = "auto",
        mla_latent_norm: bool = True,
        mla_absorb: bool = True,
        mla_latent_norm_eps: float | None = None,
        v_head_dim: int | None = None,
        rope_partial_factor: float = 1.0,
        attention_head_norm: bool = False,
        attention_head_norm_eps: float = 1e-5,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        """Store the arguments, check them (:meth:`_check`, which also resolves ``num_key_value_heads``),
        then resolve ``intermediate_size``.

        The keyword arguments stay written out: for a config with its own ``__init__`` the signature is
        its schema (``from_dict`` and ``from_pretrained`` call it with the saved fields), and a reader
        finds every field and default in one place. (transformers' own configs declare their fields
        as ``@strict`` dataclass attributes with ``validate_*`` methods; moving T6Config to that form
        would change how it validates and saves, which a tidy-up does not do.)
        """
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size  # resolved after _check
        self.attention_type = attention_type
        self.q_rank, self.k_rank, self.v_rank = q_rank, k_rank, v_rank
        self.num_key_value_heads = num_key_value_heads  # resolved by _check
        self.kv_lora_rank, self.q_lora_rank, self.qk_rope_head_dim = kv_lora_rank, q_lora_rank, qk_rope_head_dim
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tpa_contextual_a, self.tpa_contextual_b = tpa_contextual_a, tpa_contextual_b
        self.tpa_share_kv_b, self.tpa_head_activation = tpa_share_kv_b, tpa_head_activation
        self.tpa_order, self.tpa_c_dim = tpa_order, tpa_c_dim
        self.tpa_cache_head_multiple = tpa_cache_head_multiple
        self.attention_output_gate = attention_output_gate
        self.attn_impl, self.decode_impl = attn_impl, decode_impl
        self.mla_latent_norm, self.mla_absorb = mla_latent_norm, mla_absorb
        self.mla_latent_norm_eps = mla_latent_norm_eps
        self.v_head_dim = v_head_dim  # None: head_dim (kept unresolved, so a later head_dim change carries over)
        self.rope_partial_factor = rope_partial_factor
        self.attention_head_norm, self.attention_head_norm_eps = attention_head_norm, attention_head_norm_eps
        self.use_cache = use_cache
        self._check(tie_word_embeddings)
        self.intermediate_size = intermediate_size or _swiglu_width(hidden_size)
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    def _check(self, tie_word_embeddings) -> None:
        """Raise ``ValueError`` for an argument of ``__init__`` out of its range (``tie_word_embeddings``
        is passed on to transformers, so it comes as an argument); resolve ``num_key_value_heads``
        (MQA: 1, GQA: 2 by default, else H by default)."""
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {self.attention_type!r}; expected one of {ATTENTION_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_rank",
                     "k_rank", "v_rank", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if self.attention_type == "mqa":
            kv_heads = 1
        elif self.attention_type == "gqa":
            kv_heads = 2 if kv_heads is None else kv_heads
        else:
            kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"num_key_value_heads={kv_heads} must be a positive divisor of "
                             f"num_attention_heads={heads}")
        self.num_key_value_heads = kv_heads
        size = self.intermediate_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"intermediate_size must be an integer >= 1 (or None), got {size!r}")
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
            raise ValueError(f"rope_theta must be a positive finite number, got {theta!r}")
        flags = {"tie_word_embeddings": tie_word_embeddings}
        flags.update((name, getattr(self, name)) for name in (
            "tpa_contextual_a", "tpa_contextual_b", "tpa_share_kv_b", "attention_output_gate", "mla_latent_norm",
            "mla_absorb", "attention_head_norm", "use_cache"))
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false (a bool), got {value!r}")
        if self.decode_impl not in ("auto", "kernel", "reference"):
            raise ValueError(f"decode_impl must be 'auto', 'kernel' or 'reference', got {self.decode_impl!r}")
        if self.attn_impl not in ("sdpa", "factors"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'factors', got {self.attn_impl!r}")
        v_dim = self.v_head_dim
        if v_dim is not None and self.attention_type != "mla" and v_dim != self.head_dim:
            raise ValueError(f"v_head_dim is an MLA option; {self.attention_type} uses head_dim={self.head_dim} "
                             "for values")
        if v_dim is not None and (not isinstance(v_dim, int) or isinstance(v_dim, bool) or v_dim < 1):
            raise ValueError(f"v_head_dim must be an integer >= 1, got {v_dim!r}")
        factor = self.rope_partial_factor
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
            raise ValueError(f"rope_partial_factor must be a number in (0, 1], got {factor!r}")
        if factor != 1 and (self.attention_type == "mla" or self.tpa_order == 3):
            raise ValueError("rope_partial_factor applies to TPA (second order), TPA-KVonly, MHA, GQA and MQA; "
                             "MLA's rotated part is set by qk_rope_head_dim")
        self._check_cache_head_multiple()
        for name in ("rms_norm_eps", "attention_head_norm_eps", "mla_latent_norm_eps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    def _check_cache_head_multiple(self) -> None:
        multiple = self.tpa_cache_head_multiple
        if self.attention_type in ("tpa", "tpa_kvonly"):
            check_cache_head_multiple(multiple, decode_kernel_blockers(
                self.tpa_order, self.tpa_contextual_a, self.tpa_contextual_b, self.tpa_share_kv_b, self.attn_impl))
        elif multiple != 1:
            raise ValueError(f"tpa_cache_head_multiple is a TPA option; {self.attention_type} needs 1, "
                             f"got {multiple!r}")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(
                f"this checkpoint is a {model_type!r} model, not a T6 ({cls.model_type!r}) model; load it with "
                "the class of its own model type (e.g. transformers.AutoModelForCausalLM)"
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, attention_type: str = "tpa", **overrides) -> "T6Config":
        """A paper-sized (``small, medium, large, xl``) or CPU-sized (``tiny, mini``) configuration.

        Raises:
            ValueError: unknown preset or attention type.
        """
        if name not in _SIZES:
            raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {attention_type!r}; expected one of {ATTENTION_TYPES}")
        layers, width, head_dim, mha_heads, d_c, d_c_q, max_pos = _SIZES[name]
        if name in _TABLE10_HEADS:
            heads = _TABLE10_HEADS[name][attention_type]
        else:
            heads = matched_heads(attention_type, width, head_dim, mha_heads, d_c=d_c, d_c_q=d_c_q)
        values = dict(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            head_dim=head_dim,
            attention_type=attention_type,
            kv_lora_rank=d_c,
            q_lora_rank=d_c_q,
            qk_rope_head_dim=32 if head_dim >= 64 else head_dim // 2,
            max_position_embeddings=max_pos,
        )
        values.update(overrides)
        return cls(**values)

    def kv_cache_elements_per_token(self) -> int:
        """Cached numbers per token per layer (Table 1), for this configuration."""
        h, d, t = self.num_attention_heads, self.head_dim, self.attention_type
        if t in ("tpa", "tpa_kvonly"):
            a = h if self.tpa_contextual_a else 0
            if self.tpa_order == 3:
                b = d // self.tpa_c_dim + self.tpa_c_dim
            else:
                b = d
            b = b if self.tpa_contextual_b else 0
            if self.tpa_share_kv_b:
                return (self.k_rank + self.v_rank) * a + self.k_rank * b
            return (self.k_rank + self.v_rank) * (a + b)
        if t == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * d

    def kv_cache_stored_elements_per_token(self) -> int:
        """Numbers per token per layer the cache's buffers hold: :meth:`kv_cache_elements_per_token`
        with the head factors padded to ``tpa_cache_head_multiple`` heads."""
        h, multiple = self.num_attention_heads, self.tpa_cache_head_multiple
        return self.kv_cache_elements_per_token() + (self.k_rank + self.v_rank) * (-(-h // multiple) * multiple - h)

    def attention_parameters_per_layer(self) -> int:
        """Table 1's attention parameter count for this configuration (plain TPA variants only), plus the
        gains of the per-head output norm when ``attention_head_norm`` is set."""
        projections = attention_parameters(
            self.attention_type, self.hidden_size, self.num_attention_heads, self.head_dim,
            q_rank=self.q_rank, k_rank=self.k_rank, v_rank=self.v_rank, kv_heads=self.num_key_value_heads,
            d_c=self.kv_lora_rank, d_c_q=self.q_lora_rank, d_rope=self.qk_rope_head_dim, v_head_dim=self.value_head_dim,
        )
        return projections + (self.value_head_dim if self.attention_head_norm else 0)

    @property
    def value_head_dim(self) -> int:
        """E: the value size of each head (``v_head_dim`` for MLA when set, else ``head_dim``)."""
        return self.v_head_dim or self.head_dim
