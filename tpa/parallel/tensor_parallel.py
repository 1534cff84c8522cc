"""Tensor parallelism for T6: the heads of every attention layer and the SwiGLU width split over N ranks.

:func:`apply_tensor_parallel` turns a single-process :class:`tpa.T6ForCausalLM` into the part of it one
rank of a tensor-parallel group computes, with torch's DTensor and ``torch.distributed.tensor.parallel``
as torchtitan does: the output projections (``o_proj``, ``mlp.down_proj``) are ``RowwiseParallel``
(each rank holds the input columns of its heads and the partial outputs are summed), head-major
projections (MLA's ``q_b_proj``/``q_proj``/``kv_b_proj``, the MHA output gate) are ``ColwiseParallel``,
and everything every rank computes alike (embedding, norms, LM head, MLA's down projections) holds
``Replicate`` DTensors. Parameter names and global shapes stay those of the single-process model, so
a DCP checkpoint written under TP loads without TP and the other way round, and an exported model is
the plain one; the exceptions are the fused projections (below), whose single-process names and layout
:mod:`tpa.parallel.state_dict` restores for checkpoints and exports.

Why TPA shards this way
-----------------------
TPA writes each head's query, key and value as ``(1/R) A(x)^T B(x)`` with head factors ``A [R, H]``
and feature factors ``B [R, D]`` (paper eq. 3.1). Head ``h`` needs column ``h`` of ``A`` and all of
``B``: ``B`` does not belong to any head. So a rank that owns heads ``[nH/N, (n+1)H/N)`` computes the
A columns of its heads only and all of B, and caches both. Per token and layer its cache holds
``(R_k + R_v)(H/N + D)`` numbers instead of the single process's ``(R_k + R_v)(H + D)``: the head part
shrinks N-fold, the feature part does not (for the paper's D=64 and H of 34-78 the B part is most of
the cache: at TP=2 a rank of ``small`` TPA, H=34, holds (17 + 64) / (34 + 64) = 83% of one process's
cache, of ``xl``, H=78, 73%). The price in
compute is the B projection done N times; in communication, one all-reduce of the layer output
(forward) and of the layer input's gradient (backward), as for any TP attention, plus the all-reduce
of the gradients of the weights every rank uses alike (below). The baselines: MHA/GQA/MQA shard the
query heads, and the K/V heads too where N divides them (where the K/V heads divide N instead, each
rank computes and caches the one K/V head its query heads share); MLA shards its heads' up
projections, while the latent ``c_kv`` and the RoPE key, shared by all heads, are computed and cached
whole by every rank (MLA's cache does not shrink under TP).

Fused projections
-----------------
TPA's ``proj`` (all factors of q, k, v and the gate in one weight), MHA's ``qkv_proj`` and SwiGLU's
``gate_up_proj`` mix rows of several kinds in one matrix, which ``ColwiseParallel`` (a contiguous
split of the rows) would cut across. Under TP such a weight becomes a
:class:`tpa.parallel.fused.ShardedFusedLinear`: one parameter per segment, the head segments
(TPA's query, gate and head factors A, MHA's query and K/V heads, SwiGLU's two halves) ``Shard(0)``
DTensors of which each rank holds its heads' rows, the shared ones (TPA's B and third-order C
factors, K/V heads fewer than the ranks) ``Replicate``. Each rank holds ``(head rows) / N + (shared
rows)`` rows of the weight; only the shared rows' gradients are summed over the group. With
``shard_shared`` the shared rows are ``Shard(0)`` too and all-gathered at each use (each rank then
holds ``1/N`` of the weight). Checkpoints keep the single-process layout through
:mod:`tpa.parallel.state_dict`.

Gradient bookkeeping (Megatron's f/g operators): a tensor every rank computes alike that enters a
rank's own heads (the input of a fused projection, MLA's RoPE key and, in the absorbed cached path,
its latent) passes through :func:`sum_gradients`, which is the identity forward and all-reduces its
gradient backward; ``RowwiseParallel`` all-reduces the output forward. Weights used alike by all ranks
inside a layer (fused projections, the per-head output norm's gain) get their gradients all-reduced
the same way.

``output_attentions=True`` returns the softmax weights of all heads: each layer's local weights are
gathered over the group (in rank order, which is head order; the backward keeps each rank's slice).

Not supported under TP, with a clear error: a head count (or K/V head count, or SwiGLU width) that N
does not divide; TPA with learned (non-contextual) factors or a softmax over heads. The FlashTPA decode
kernel needs nothing special (it reads the local factor cache, whose head count is H/N).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn import functional as F

from tpa.layers import MultiHeadAttention, MultiHeadLatentAttention, TensorProductAttention
from tpa.modules import RMSNorm
from tpa.parallel.comm import gather_heads, sum_gradients
from tpa.parallel.fused import Segment, ShardedFusedLinear

__all__ = ["apply_tensor_parallel", "make_mesh", "setup_tensor_parallel", "sum_gradients"]


def make_mesh(tp: int, device_type: str) -> DeviceMesh:
    """A ``(dp, tp)`` mesh over all ranks (``dp = world_size / tp``); ranks ``r`` with equal ``r // tp`` form a TP group."""
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp} must be a positive divisor of the number of ranks ({world})")
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def setup_tensor_parallel(tp: int, device: str = "auto") -> tuple[DeviceMesh, str]:
    """Join the process group of a torchrun launch of exactly ``tp`` ranks (NCCL on GPUs, gloo on CPUs)
    and return its 1-D mesh and this rank's device (``cuda:LOCAL_RANK`` or ``cpu``)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world != tp:
        raise ValueError(f"--tp {tp} needs a launch of {tp} processes (`torchrun --nproc_per_node {tp} ...`); "
                         f"this one has {world}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return init_device_mesh(torch.device(device).type, (tp,), mesh_dim_names=("tp",)), device


def _divisors(count: int) -> list[int]:
    return [d for d in range(2, count + 1) if count % d == 0]


def _check_divides(n: int, count: int, what: str) -> None:
    """Raise a ValueError that names the TP sizes ``count`` allows and the nearest counts ``n`` divides."""
    if count % n == 0:
        return
    sizes = _divisors(count)
    allowed = (f"{count} is prime: only --tp {count} splits it" if sizes == [count] else
               f"the TP sizes that split it: {', '.join(map(str, sizes))}" if sizes else "no TP size splits it")
    below, above = count - count % n, count - count % n + n
    nearest = f"{below} or {above}" if below else f"{above}"
    raise ValueError(f"tensor parallelism over {n} ranks needs {what} divisible by {n}, got {count} ({allowed}); "
                     f"the nearest values that {n} divides are {nearest} (a different model: e.g. "
                     f"--model-overrides '{{\"{what}\": {above}}}' for a new one)")


class _HeadNorm(RMSNorm):
    """The per-head output norm under TP: the gain is shared by all heads, so its gradient is summed over the group."""

    def __init__(self, norm: RMSNorm, mesh: DeviceMesh):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Replicate()]))
        self.group = mesh.get_group()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        gain = sum_gradients(self.weight.to_local(), self.group)
        return F.rms_norm(x.to(work), (x.shape[-1],), gain.to(work), self.eps).to(x.dtype)


def _to_local_output(module, outputs, mesh):
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


def _to_replicate_inputs(module, inputs, mesh):
    return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) if isinstance(t, torch.Tensor)
                 and not isinstance(t, DTensor) else t for t in inputs)


def _replicate(module: nn.Module, mesh: DeviceMesh, output_fn=None) -> None:
    """Every parameter of ``module`` a ``Replicate`` DTensor (rank 0's values); local tensors in and out."""
    distribute_module(module, mesh, input_fn=_to_replicate_inputs, output_fn=output_fn or _to_local_output)


# ---------------------------------------------------------------------------------------------- layers


def _check_layer(attn: nn.Module, n: int) -> None:
    """Raise a ValueError naming what of ``attn`` cannot be split over ``n`` ranks."""
    if type(attn) not in _LAYERS:
        raise ValueError(f"tensor parallelism does not know the attention layer {type(attn).__name__}")
    _check_divides(n, attn.num_heads, "num_attention_heads")
    if isinstance(attn, TensorProductAttention):
        if not (attn.contextual_a and attn.contextual_b):
            raise ValueError("tensor parallelism is implemented for contextual TPA factors only "
                             "(tpa_contextual_a and tpa_contextual_b True)")
        if attn.head_activation == "softmax":
            raise ValueError("tensor parallelism does not support tpa_head_activation='softmax' (a softmax over "
                             "all heads couples the ranks); use 'none' or 'sigmoid'")
    if isinstance(attn, MultiHeadAttention) and attn.num_kv_heads % n and n % attn.num_kv_heads:
        raise ValueError(f"tensor parallelism over {n} ranks needs num_key_value_heads={attn.num_kv_heads} to "
                         f"divide {n} or be divisible by it")


def _tpa_segments(layer: TensorProductAttention) -> list[Segment]:
    """The segments of TPA's ``proj``: the query ``[H, D]``, gate ``[H, E]`` and head factors ``A [R, H]``
    split by heads; the feature factors ``B [R, D]`` and ``C [R, d_c]``, which no head owns, shared."""
    h, segments, offset = layer.num_heads, [], 0
    for name, size in layer.segments:
        if name == "q":
            seg = Segment(name, offset, h, layer.head_dim)
        elif name == "gate":
            seg = Segment(name, offset, h, layer.value_dim)
        elif name.startswith("a_"):
            seg = Segment(name, offset, h, layer.factor_shapes[name][0], head_major=False)
        else:  # b_*, c_*
            seg = Segment(name, offset, size, 1, sharded=False)
        segments.append(seg)
        offset += size
    return segments


def _tpa(layer: TensorProductAttention, mesh: DeviceMesh, n: int, rank: int, shard_shared: bool) -> None:
    local = layer.num_heads // n
    layer.proj = ShardedFusedLinear(layer.proj, _tpa_segments(layer), mesh, shard_shared)
    layer.segments = [(s.name, s.size // n if s.sharded else s.size) for s in layer.proj.segments]
    layer.factor_shapes = {name: ((r, local) if name.startswith("a_") else (r, w))
                           for name, (r, w) in layer.factor_shapes.items()}
    layer.num_heads = local
    parallelize_module(layer, mesh, {"o_proj": RowwiseParallel()})


def _mha(layer: MultiHeadAttention, mesh: DeviceMesh, n: int, rank: int, shard_shared: bool) -> None:
    h, g, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    segments = [Segment("q", 0, h, d)]
    if g % n == 0:  # K/V heads split like the query heads
        kv_local = g // n
        segments += [Segment("k", h * d, g, d), Segment("v", (h + g) * d, g, d)]
    elif n % g == 0:  # N/G ranks share one K/V head: each holds all G (G < N rows) and computes the one it uses
        kv_local, kv_head = 1, rank // (n // g)
        rows = (kv_head * d, (kv_head + 1) * d)
        segments += [Segment("k", h * d, g * d, 1, sharded=False, rows=rows),
                     Segment("v", (h + g) * d, g * d, 1, sharded=False, rows=rows)]
    else:  # refused by _check_layer
        raise AssertionError(g)
    layer.qkv_proj = ShardedFusedLinear(layer.qkv_proj, segments, mesh, shard_shared)
    plan = {"o_proj": RowwiseParallel()}
    if layer.gate_proj is not None:
        plan["gate_proj"] = ColwiseParallel()
    parallelize_module(layer, mesh, plan)
    layer.num_heads, layer.num_kv_heads = h // n, kv_local


def _mla(layer: MultiHeadLatentAttention, mesh: DeviceMesh, n: int, rank: int, shard_shared: bool) -> None:
    group = mesh.get_group()
    plan = {"o_proj": RowwiseParallel(), "kv_b_proj": ColwiseParallel()}
    plan["q_b_proj" if layer.q_lora_rank else "q_proj"] = ColwiseParallel()
    parallelize_module(layer, mesh, plan)
    if layer.q_lora_rank:  # c_Q reaches the heads through q_b_proj (ColwiseParallel sums its gradient)
        _replicate(layer.q_a_proj, mesh)
        _replicate(layer.q_a_norm, mesh)
    _replicate(layer.kv_a_norm, mesh)
    _replicate(layer.kv_a_proj, mesh)
    # the RoPE key (and, in the absorbed cached path, the latent) go to this rank's heads directly
    layer.shared_for_heads = functools.partial(sum_gradients, group=group)
    layer.num_heads //= n


def _head_norm(layer, mesh: DeviceMesh) -> None:
    if getattr(layer, "head_norm", None) is not None:
        layer.head_norm = _HeadNorm(layer.head_norm, mesh)


def _mlp(mlp, mesh: DeviceMesh, n: int, rank: int) -> None:
    width = mlp.intermediate_size
    mlp.gate_up_proj = ShardedFusedLinear(mlp.gate_up_proj, [Segment("gate", 0, width, 1),
                                                             Segment("up", width, width, 1)], mesh)
    parallelize_module(mlp, mesh, {"down_proj": RowwiseParallel()})
    mlp.intermediate_size = width // n


def _gather_attention_weights(attn: nn.Module, args, output):
    """Forward hook: the softmax weights ``[B, H/N, T, L]`` this layer appended -> all heads ``[B, H, T, L]``."""
    ctx = args[1] if len(args) > 1 else None
    weights = getattr(ctx, "attention_weights", None)
    if weights:
        weights[-1] = gather_heads(weights[-1], attn.tp_group, dim=1)
    return output


_LAYERS = {TensorProductAttention: _tpa, MultiHeadAttention: _mha, MultiHeadLatentAttention: _mla}


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, *, shard_shared: bool = False) -> nn.Module:
    """Shard ``model`` (a T6ForCausalLM or T6Model on this rank's device) over the 1-D mesh ``mesh``, in place.

    Every rank must hold the same architecture; the weights are taken from rank 0 (sharded or
    broadcast from it). Returns ``model``. Afterwards the model takes and returns ordinary tensors,
    every rank gets the same logits, and ``T6Cache.for_model(model, ...)`` builds the per-rank cache
    (local head factors, full feature factors; see the module docstring). The fused projections hold
    one parameter per segment (``proj.weight_a_q``, ...): for a state dict in the single-process
    names and layout (DCP checkpoints, exports) pass it through :func:`tpa.parallel.to_plain`.

    ``shard_shared``: also hold the rows of the fused projections that every rank uses (TPA's feature
    factors B and C, K/V heads fewer than the ranks) ``1/N`` per rank and all-gather them at each use
    (:class:`tpa.parallel.fused.ShardedFusedLinear`): each rank then holds ``1/N`` of every fused
    weight, its gradient and its optimizer state. A training step moves as many bytes as without it
    (a reduce-scatter of those rows' gradients instead of an all-reduce, plus their all-gather; one
    all-gather more where activation checkpointing recomputes the forward); a decoding step gains one
    all-gather of those rows per layer, so generation leaves it off. MLA has no fused projection: its
    shared down projections stay replicated either way.

    Raises:
        ValueError: a head, K/V head or SwiGLU width that the mesh size does not divide, or a TPA
            variant TP does not implement (the message says which).
    """
    if mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel expects the 1-D tensor-parallel mesh (mesh['tp']), got {mesh.ndim}-D")
    n, rank = mesh.size(), mesh.get_local_rank()
    base = getattr(model, "model", model)
    if getattr(base, "tensor_parallel_size", 1) != 1:
        raise ValueError("this model is already tensor-parallel")
    for block in base.layers:  # check every layer before changing any
        _check_layer(block.self_attn, n)
        _check_divides(n, block.mlp.intermediate_size, "intermediate_size")
    if n == 1:
        return model
    for block in base.layers:
        attn = block.self_attn
        _head_norm(attn, mesh)
        _LAYERS[type(attn)](attn, mesh, n, rank, shard_shared)
        attn.tp_group = mesh.get_group()
        attn.register_forward_hook(_gather_attention_weights)
        _mlp(block.mlp, mesh, n, rank)
        _replicate(block.input_layernorm, mesh)
        _replicate(block.post_attention_layernorm, mesh)
    _replicate(base.norm, mesh)
    tied = hasattr(model, "lm_head") and model.lm_head.weight is base.embed_tokens.weight
    _replicate(base.embed_tokens, mesh)
    if hasattr(model, "lm_head"):
        if tied:
            model.lm_head.weight = base.embed_tokens.weight
        _replicate(model.lm_head, mesh)
    base.tensor_parallel_size = n
    return model

