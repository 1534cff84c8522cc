"""The T6 model (paper Section 4.3): LLaMA with a pluggable attention, as a transformers model.

Block: ``x <- x + Attention(RMSNorm(x))``, ``x <- x + SwiGLU(RMSNorm(x))``; a final RMSNorm and an
LM head tied to the embedding by default. ``config.attention_type`` picks TPA, TPA-KVonly, MHA,
GQA, MQA or MLA; every type runs through the same code path and cache.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

from tpa.layers import AttentionContext, MultiHeadAttention, MultiHeadLatentAttention, TensorProductAttention
from tpa.layers.base import scaled_normal_
from tpa.models.t6.cache_t6 import T6Cache
from tpa.models.t6.configuration_t6 import T6Config
from tpa.models.t6.decode_graph import model_unchanged
from tpa.models.t6.hf_compat import CACHE_NAME, cache_kwargs, pick_cache
from tpa.models.t6.quantization import check_quantized_layers
from tpa.modules import RMSNorm, RotaryEmbedding, SwiGLU

logger = logging.get_logger(__name__)


def build_attention(config: T6Config, out_init_std: float) -> nn.Module:
    """The attention layer ``config.attention_type`` names."""
    common = dict(init_std=config.initializer_range, out_init_std=out_init_std,
                  head_norm=config.attention_head_norm, head_norm_eps=config.attention_head_norm_eps)
    t = config.attention_type
    h, d, c = config.num_attention_heads, config.head_dim, config.hidden_size
    if t in ("tpa", "tpa_kvonly"):
        return TensorProductAttention(
            c, h, d, config.q_rank, config.k_rank, config.v_rank,
            factorize_q=(t == "tpa"),
            contextual_a=config.tpa_contextual_a,
            contextual_b=config.tpa_contextual_b,
            share_kv_b=config.tpa_share_kv_b,
            head_activation=config.tpa_head_activation,
            order=config.tpa_order,
            c_dim=config.tpa_c_dim,
            output_gate=config.attention_output_gate,
            attn_impl=config.attn_impl,
            rope_partial_factor=config.rope_partial_factor,
            cache_head_multiple=config.tpa_cache_head_multiple,
            **common,
        )
    if t in ("mha", "gqa", "mqa"):
        return MultiHeadAttention(c, h, d, config.num_key_value_heads, output_gate=config.attention_output_gate,
                                  rope_partial_factor=config.rope_partial_factor, **common)
    if config.attention_output_gate:
        raise ValueError("attention_output_gate is not implemented for MLA")
    return MultiHeadLatentAttention(
        c, h, d, config.kv_lora_rank, config.q_lora_rank, config.qk_rope_head_dim,
        latent_norm=config.mla_latent_norm, absorb=config.mla_absorb, value_dim=config.value_head_dim,
        eps=config.rms_norm_eps if config.mla_latent_norm_eps is None else config.mla_latent_norm_eps, **common,
    )


AUTO_MAP = {
    "AutoConfig": "configuration_t6.T6Config",
    "AutoModel": "modeling_t6.T6Model",
    "AutoModelForCausalLM": "modeling_t6.T6ForCausalLM",
    "AutoModelForSequenceClassification": "modeling_t6.T6ForSequenceClassification",
}
AUTO_MAP_FILES = {
    "configuration_t6.py": '"""T6 configuration: provided by the installed `tpa` package (pip install tensor-product-attention)."""\n'
    "from tpa.models.t6.configuration_t6 import T6Config\n",
    "modeling_t6.py": '"""T6 model: provided by the installed `tpa` package (pip install tensor-product-attention)."""\n'
    "from tpa.models.t6.modeling_t6 import T6ForCausalLM, T6ForSequenceClassification, T6Model\n",
}


def uncached_plan(valid: torch.Tensor, padded: bool,
                  sync_free: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RoPE positions ``[B, T]`` and attention mask ``[B, T, T]`` (None: plain causal) of a call
    without a cache; ``valid [B, T]`` marks real tokens. With padding, positions count real tokens
    and padding keys are masked out (a padding query sees itself, so its softmax row is not empty).

    An all-ones mask takes the causal kernel; under ``torch.compile`` (``sync_free``) that check would be a
    graph break (a host read), so there a given mask is always applied as an explicit mask."""
    bsz, seq = valid.shape
    if not padded or (not sync_free and bool(valid.all())):
        return torch.arange(seq, device=valid.device).expand(bsz, seq), None
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    idx = torch.arange(seq, device=valid.device)
    mask = (idx[None, None, :] <= idx[None, :, None]) & valid[:, None, :]
    return positions, mask | torch.eye(seq, dtype=torch.bool, device=valid.device)[None]


def weights_by_column(weights: list[torch.Tensor], kv, step) -> list[torch.Tensor]:
    """Attention weights over cache slots ``[B, H, T, kv_len]`` -> over input columns
    ``[B, H, T, past + T]``, as transformers' models return them (zero at padding columns).

    The ragged cache packs each sequence's valid tokens into slots ``0, 1, ...``: column ``c`` of
    sequence ``b`` sits at slot ``(number of valid columns up to c) - 1``. Call before ``kv.commit``.
    """
    history = kv.column_valid()
    valid = step.valid if history is None else torch.cat([history, step.valid.to(history.device)], dim=1)
    slot = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, past + T]
    out = []
    for w in weights:
        index = slot[:, None, None, :].expand(w.shape[0], w.shape[1], w.shape[2], slot.shape[1]).to(w.device)
        out.append(w.gather(-1, index).masked_fill(~valid[:, None, None, :].to(w.device), 0))
    return out


class T6DecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block. ``forward(x [B, T, C], ctx) -> [B, T, C]``; checkpointed (recomputed in the
    backward pass) after ``model.gradient_checkpointing_enable()``.

    With ``ctx.fused_step`` the block leaves its last residual add to the next norm's launch:
    ``forward(x, ctx, pending)`` adds ``pending`` (the previous block's MLP output, or None) to ``x``
    in its first norm's kernel and returns ``(x + pending + attention, mlp output)``; the caller adds
    the last block's MLP output in the final norm's kernel; SwiGLU's activation is one launch too. The
    numbers are the unfused block's."""

    def __init__(self, config: T6Config, out_init_std: float):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, out_init_std)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, pending: torch.Tensor | None = None):
        if ctx.fused_step:
            backend = "triton" if ctx.decode_impl == "kernel" else "auto"
            x, h = self.input_layernorm.add_and_norm(x, pending, backend=backend)
            x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(h, ctx), backend=backend)
            return x, self.mlp(h, fused_backend=backend)
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class T6PreTrainedModel(PreTrainedModel):
    config_class = T6Config
    config: T6Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["T6DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Write ``config.json``, safetensors weights and two small code files (``auto_map``), so that
        tools which never import ``tpa`` (``lm_eval --model hf``, plain transformers) can load the
        directory with ``trust_remote_code=True``; after ``import tpa`` no remote code is needed."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for name, text in AUTO_MAP_FILES.items():
                with open(os.path.join(save_directory, name), "w") as f:
                    f.write(text)
        return result

    def _out_init_std(self) -> float:
        # nanoGPT: residual output projections get std 0.02 / sqrt(2 L)
        return self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if hasattr(module, "reset_parameters") and isinstance(
            module, (TensorProductAttention, MultiHeadAttention, MultiHeadLatentAttention)
        ):
            module.reset_parameters()
        elif isinstance(module, SwiGLU):
            scaled_normal_(module.gate_up_proj.weight, std)
            scaled_normal_(module.down_proj.weight, self._out_init_std())
        elif isinstance(module, RotaryEmbedding):  # non-persistent tables: rebuilt after a (meta-device) load
            module.reset_tables()
        elif isinstance(module, RMSNorm):
            if not getattr(module.weight, "_is_hf_initialized", False):
                nn.init.ones_(module.weight)
        elif isinstance(module, (nn.Embedding, nn.Linear)):
            scaled_normal_(module.weight, std)


class T6Model(T6PreTrainedModel):
    """Embedding, blocks and final norm. ``forward`` returns the last hidden states and the cache."""

    def __init__(self, config: T6Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        out_std = config.initializer_range / (2 * config.num_hidden_layers) ** 0.5
        self.layers = nn.ModuleList([T6DecoderLayer(config, out_std) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(self.layers[0].self_attn.rope_dim, config.rope_theta,
                                      config.max_position_embeddings)
        self._rotates_cached_keys = any(block.self_attn.rotates_cached_keys for block in self.layers)
        self.gradient_checkpointing = False
        self._quantization_checked = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _options(self, use_cache, cache, output_hidden_states, output_attentions):
        """This call's ``(use_cache, cache, output_hidden_states, output_attentions)``, defaulting to
        the config's values (see :meth:`forward`)."""
        training_step = self.training and torch.is_grad_enabled()
        if use_cache is None:  # a T6 cache copies what it holds: no default cache for a training step
            use_cache = self.config.use_cache and not training_step
        if self.gradient_checkpointing and training_step and (use_cache or cache is not None):
            logger.warning_once("a cache is incompatible with gradient checkpointing: running with use_cache=False")
            use_cache, cache = False, None
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        return use_cache, cache, output_hidden_states, output_attentions

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
                raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
            bsz, seq = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape [batch, seq, {self.config.hidden_size}], "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            bsz, seq = inputs_embeds.shape[:2]
        if seq == 0:
            raise ValueError("got an empty sequence (seq length 0)")
        if bsz == 0:
            raise ValueError("got an empty batch (batch size 0)")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != bsz
                                           or attention_mask.shape[1] < seq):
            raise ValueError(
                f"attention_mask must be a 2D [batch, past + seq] mask of 1 (token) and 0 (padding) with batch "
                f"{bsz} and at least {seq} columns, got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None and tuple(position_ids.shape) not in ((bsz, seq), (1, seq)):
            raise ValueError(f"position_ids must have shape [{bsz}, {seq}], got {tuple(position_ids.shape)}")
        if position_ids is not None and (position_ids.dtype.is_floating_point or position_ids.dtype.is_complex
                                         or position_ids.dtype == torch.bool):
            raise TypeError(f"position_ids must be integer positions, got {position_ids.dtype}")
        return bsz, seq

    def _cache_of_call(self, cache, use_cache, output_attentions, bsz) -> T6Cache | None:
        """The :class:`T6Cache` this call reads and extends (a new one when ``use_cache`` and none is
        given), or None; checked against the model and the options."""
        if cache is not None and not isinstance(cache, T6Cache):
            raise TypeError(
                f"the cache (`cache` or `past_key_values`) must be a tpa T6Cache (got {type(cache).__name__}); "
                "create one with T6Cache.for_model(model, batch_size) or let forward/generate create it"
            )
        if cache is not None:
            cache.check_fits(self)
        if use_cache and cache is None:
            cache = T6Cache.for_model(self, bsz)
        if output_attentions and cache is not None and cache.static:
            raise ValueError("output_attentions=True needs a dynamic cache or none: a static cache does not record "
                             "which input columns its slots came from (and its steps may replay a CUDA graph)")
        return cache

    def _positions_and_mask(self, kv, valid, position_ids, padded: bool, sync_free: bool):
        """``(step, positions [B, T], mask)`` of this call. With the cache's ``kv`` they come from its
        step (``kv.begin``); without one, ``step`` is None and they are planned for ``valid [B, T]``
        alone. Checks the batch size, the length and (unless ``sync_free``) the position range."""
        bsz, seq = valid.shape
        max_pos = self.config.max_position_embeddings
        if kv is not None:
            if kv.batch_size != bsz:
                raise ValueError(f"the cache was built for batch size {kv.batch_size}, got a batch of {bsz}")
            step = kv.begin(valid, position_ids)
            positions, mask = step.positions, step.mask
        else:
            step = None
            if seq > max_pos:
                raise ValueError(f"sequence of {seq} tokens exceeds max_position_embeddings={max_pos}")
            positions, mask = uncached_plan(valid, padded=padded, sync_free=sync_free)
            if position_ids is not None:
                positions = position_ids
        if position_ids is not None and not sync_free:  # the RoPE tables hold positions [0, max_pos)
            lowest, highest = (int(v) for v in torch.aminmax(position_ids))
            if lowest < 0 or highest >= max_pos:
                raise ValueError(f"position ids must lie in [0, {max_pos}) (max_position_embeddings), got values "
                                 f"from {lowest} to {highest}")
        return step, positions, mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: T6Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: T6Cache | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``cache`` and ``past_key_values`` are two names of one argument (transformers >= 5.24 passes
        ``cache``); the output carries the cache under the installed transformers' name.

        As in transformers' models, ``use_cache``, ``output_hidden_states``, ``output_attentions``
        and ``return_dict`` default to the config's values, except that a training step (training
        mode, gradients on) keeps no cache unless ``use_cache=True`` is passed: unlike transformers'
        ``DynamicCache``, which holds the key/value tensors autograd keeps anyway, a T6 cache is a
        copy; under gradient checkpointing none at all. ``hidden_states`` holds ``L + 1`` tensors
        ``[B, T, C]`` (the embeddings, the input of every later block, the final normed output);
        ``attentions`` holds ``L`` softmax weights ``[B, H, T, past + T]``.
        """
        bsz, seq = self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        if not self._quantization_checked and getattr(self.config, "quantization_config", None) is not None:
            check_quantized_layers(self)
            self._quantization_checked = True
        use_cache, past_key_values, output_hidden_states, output_attentions = self._options(
            use_cache, pick_cache(cache, past_key_values), output_hidden_states, output_attentions)
        # a one-token step of a static cache runs without host syncs (it may be captured in a CUDA graph)
        static_step = isinstance(past_key_values, T6Cache) and past_key_values.static and seq == 1
        # the range checks sync with the device: skip them in compiled graphs, in CUDA training steps and in
        # static steps (an out-of-range id then fails in the embedding lookup)
        sync_free = torch.compiler.is_compiling() or static_step
        check_ids = input_ids is not None and not sync_free and (input_ids.device.type == "cpu" or not self.training)
        if check_ids and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got values outside")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        device = hidden.device
        valid = (attention_mask[:, -seq:] != 0) if attention_mask is not None else \
            torch.ones(bsz, seq, dtype=torch.bool, device=device)
        if position_ids is not None:
            position_ids = position_ids.expand(bsz, seq).to(device)

        past_key_values = self._cache_of_call(past_key_values, use_cache, output_attentions, bsz)
        kv = past_key_values.kv if past_key_values is not None else None
        step, positions, mask = self._positions_and_mask(kv, valid.to(device) if kv is not None else valid,
                                                         position_ids, attention_mask is not None, sync_free)
        layer_caches = kv.layers if kv is not None else [None] * len(self.layers)
        # rows of the float32 tables; a float64 model (a reference) forms its angles in float64 instead
        rope_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        cos, sin = self.rotary(positions, dtype=rope_dtype)
        if step is not None and self._rotates_cached_keys:  # the key slots' RoPE tables, once for all layers
            step.key_cos, step.key_sin = self.rotary(step.key_positions, dtype=rope_dtype)
        all_hidden, weights = [], [] if output_attentions else None
        # a static one-token step adds each block's output in the next norm's launch (T6DecoderLayer)
        fused_step = static_step and not output_hidden_states and self.config.decode_impl != "reference"
        pending = None
        for block, layer_cache in zip(self.layers, layer_caches):
            ctx = AttentionContext(cos=cos, sin=sin, mask=mask, cache=layer_cache, step=step, kv_cache=kv,
                                   rotary=self.rotary, decode_impl=self.config.decode_impl, attention_weights=weights,
                                   fused_step=fused_step)
            if output_hidden_states:
                all_hidden.append(hidden)
            if fused_step:
                hidden, pending = block(hidden, ctx, pending)
            else:
                hidden = block(hidden, ctx)
        if kv is not None:
            if output_attentions:
                weights = weights_by_column(weights, kv, step)
            kv.commit(step)
        if fused_step:
            _, hidden = self.norm.add_and_norm(hidden, pending,
                                               backend="triton" if self.config.decode_impl == "kernel" else "auto")
        else:
            hidden = self.norm(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) + (hidden,) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
            **cache_kwargs(past_key_values),
        )


# keywords of prepare_inputs_for_generation that are not passed on to forward (transformers' generic method)
_NOT_FORWARDED_IN_A_STEP = frozenset({"labels", "next_sequence_length", "is_first_iteration", "position_ids"})
_FORWARDED_UNLESS_NONE = frozenset({"attention_mask", "token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids"})


class T6ForCausalLM(T6PreTrainedModel, GenerationMixin):
    """T6 with an LM head.

    ``forward(input_ids [B, T], attention_mask=None [B, past+T], position_ids=None [B, T],
    cache=None, use_cache=None, labels=None [B, T])`` returns logits ``[B, T, V]``, the next-token
    loss when labels are given (transformers' ``loss_function``: shifted inside, -100 ignored,
    ``shift_labels``/``num_items_in_batch`` honoured), the cache (``use_cache`` defaults as in
    :meth:`T6Model.forward`) and, on request, hidden states and attention weights.
    ``logits_to_keep``: the last N positions (an int) or the positions in a tensor.
    ``past_key_values`` is accepted as another name of ``cache`` (transformers before 5.24 uses it);
    the output carries the cache under the installed transformers' name (``out.cache`` from 5.24).

    With a static :class:`T6Cache` on CUDA (``generate(..., cache_implementation="static")`` or
    ``T6Cache.for_model(model, B, capacity, static=True)``), a one-token call without gradients is
    the replay of a captured CUDA graph of the step (:mod:`tpa.models.t6.decode_graph`); its results
    are the eager static step's.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # `_can_compile_fullgraph` stays False: the dynamic cache plans each call with a host sync, and the
    # static path is captured as a CUDA graph by tpa.models.t6.decode_graph rather than compiled by
    # generate() (T6Cache.is_compileable is False for the same reason)

    def __init__(self, config: T6Config):
        super().__init__(config)
        self.model = T6Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new: nn.Linear) -> None:
        self.lm_head = new

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: T6Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: T6Cache | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        past_key_values = pick_cache(cache, past_key_values)
        graph = getattr(past_key_values, "decode_graph", None)
        wants_extras = (output_hidden_states or self.config.output_hidden_states
                        or output_attentions or self.config.output_attentions)
        if graph is not None and not wants_extras and graph.handles(input_ids, inputs_embeds, labels, logits_to_keep):
            # a one-token step over a static cache on CUDA: replay the captured step (tpa.models.t6.decode_graph)
            logits = graph.step(self, input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return CausalLMOutputWithPast(logits=logits, **cache_kwargs(past_key_values))
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:  # a tensor of the positions to keep
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            if labels is not None and labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            # transformers' causal LM loss: labels shifted inside (or pre-shifted `shift_labels`), -100
            # ignored, mean over tokens (or a sum over `num_items_in_batch`)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **cache_kwargs(getattr(out, CACHE_NAME)))

    def generate(self, *args, **kwargs):
        """transformers' ``GenerationMixin.generate`` (same arguments and result). Its steps over a static
        cache on CUDA replay a captured graph that checks the model's weights once per call, at the
        first step, rather than at every step (:func:`tpa.models.t6.decode_graph.model_unchanged`)."""
        with model_unchanged(self):
            return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """transformers' ``prepare_inputs_for_generation`` (same arguments and result), with a short path
        for a one-token step over a cache whose steps replay a CUDA graph.

        That path runs on the host between one step's stopping check, which waits for the GPU, and the
        next replay, while the GPU is idle. It returns what the generic method does (the last token,
        the last position, the mask, the cache and the other keywords forwarded to ``forward``) as views
        rather than copies (the graph step copies them into its static inputs) and without the
        generic method's device queries. Other calls, and transformers versions that do not pass
        ``next_sequence_length=1`` for a decode step, take the generic method.
        """
        cache = kwargs.get(CACHE_NAME)
        graph = getattr(cache, "decode_graph", None)
        if (graph is None or kwargs.get("next_sequence_length") != 1 or inputs_embeds is not None
                or kwargs.get("is_first_iteration") or input_ids.device != graph.device):
            return super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        model_inputs = {"input_ids": input_ids[:, -1:], CACHE_NAME: cache}
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            model_inputs["position_ids"] = position_ids[..., -1:]
        for key, value in kwargs.items():
            if key not in model_inputs and key not in _NOT_FORWARDED_IN_A_STEP and (
                    value is not None or key not in _FORWARDED_UNLESS_NONE):
                model_inputs[key] = value
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        """``generate()`` gets a preallocated :class:`T6Cache` instead of transformers' caches.

        ``cache_implementation=None`` or ``"dynamic"``: a dynamic T6Cache. ``"static"``: a static one
        of capacity ``max(prompt width + max_new_tokens - 1, generation_config.max_cache_len)``, whose
        decode steps replay a captured CUDA graph on CUDA (:mod:`tpa.models.t6.decode_graph`).
        """
        if model_kwargs.get(CACHE_NAME) is not None or generation_config.use_cache is False:
            return
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(f"T6 generates with its own T6Cache: cache_implementation may be 'dynamic' or 'static', "
                             f"got {implementation!r}")
        static = implementation == "static"
        if static and generation_config.max_cache_len is not None:
            max_cache_length = max(max_cache_length, generation_config.max_cache_len)
        beams = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        model_kwargs[CACHE_NAME] = T6Cache.for_model(self, batch_size * beams, capacity=max_cache_length,
                                                            static=static)


class T6ForSequenceClassification(GenericForSequenceClassification, T6PreTrainedModel):
    """T6 with a linear ``score`` head on the last non-padding token (``config.pad_token_id``), as
    ``LlamaForSequenceClassification``: ``forward(input_ids [B, T], labels=None [B])`` returns
    ``logits [B, num_labels]`` and the loss (regression, single- or multi-label per
    ``config.problem_type``)."""
