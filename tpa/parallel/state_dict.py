"""State dicts of a tensor-parallel model in the single-process layout, for DCP checkpoints and exports.

Under TP a fused projection holds one parameter per segment (:mod:`tpa.parallel.fused`):
``proj.weight_a_q``, ``proj.weight_b_q``, ... instead of ``proj.weight``. :func:`to_plain` puts the one
``proj.weight [S, C]`` of the single-process model back into a model (and optimizer) state dict: as a
full tensor where the state dict holds full tensors (``full_state_dict=True``: an export), and
otherwise as a :class:`PlainRows`, which tells DCP which rows of ``[S, C]`` this rank holds (views of
its segment shards, so DCP reads straight into them). A checkpoint of a TP model therefore has the
single-process names, shapes and layout: it loads under any TP size, FSDP2 or one process, and the
other way round.

Usage around DCP (what ``tpa.train.checkpoint`` does)::

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = dict(zip(("model", "optim"), to_plain(model, model_sd, optim_sd)))
    dcp.load(state, ...)                      # or dcp.save(state, ...)
    model_sd, optim_sd = from_plain(model, state["model"], state["optim"], model_sd, optim_sd)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from tpa.parallel.fused import ShardedFusedLinear

__all__ = ["PlainRows", "from_plain", "fused_modules", "to_plain"]


class PlainRows(torch.Tensor):
    """A fused weight ``[S, C]`` as DCP sees it: the rows this rank holds, as ``(first row, view [rows, C])``.

    It carries no data of its own and supports no operation; DCP writes its chunks and reads into them
    (rows that several ranks hold, the shared segments, are written once).
    """

    @staticmethod
    def __new__(cls, shape: tuple[int, int], chunks: list[tuple[int, torch.Tensor]], like: torch.Tensor):
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=like.dtype, device=like.device)
        self.chunks = chunks
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{func} is not supported on a PlainRows: it only describes a tensor-parallel fused "
                        "weight's shards to torch.distributed.checkpoint")

    def __repr__(self) -> str:
        return f"PlainRows(shape={tuple(self.shape)}, rows={[(r, len(v)) for r, v in self.chunks]})"

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size([row, 0]), sizes=view.shape) for row, view in self.chunks]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(view),
                                                      size=self.shape))
                for chunk, (_, view) in zip(self.__create_chunk_list__(), self.chunks)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for row, view in self.chunks:
            if index.offset == torch.Size([row, 0]):
                return view
        raise ValueError(f"{index.fqn}: this rank holds no rows starting at {index.offset}")


def fused_modules(model: nn.Module) -> dict[str, ShardedFusedLinear]:
    """Every :class:`ShardedFusedLinear` of ``model`` by its qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedFusedLinear)}


def _plain(module: ShardedFusedLinear, values: list[torch.Tensor]) -> torch.Tensor:
    """The segments' tensors (parameters, or optimizer states shaped like them) as the one ``[S, C]``."""
    if not any(isinstance(v, DTensor) for v in values):  # full tensors
        return torch.cat([v if seg.head_major else v.transpose(0, 1).reshape(-1, module.in_features)
                          for seg, v in zip(module.segments, values)])
    chunks = []
    for seg, value in zip(module.segments, values):
        shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        local = value.to_local()
        if tuple(local.shape) != tuple(shape):
            raise ValueError(f"{seg.name}: a local shard {tuple(local.shape)} where its placements "
                             f"{value.placements} give {tuple(shape)}")
        chunks += seg.plain_rows(local, tuple(offset))
    return PlainRows((module.out_features, module.in_features), chunks, values[0].to_local())


def _keys(prefix: str, module: ShardedFusedLinear) -> list[str]:
    return [f"{prefix}.weight_{seg.name}" for seg in module.segments]


def to_plain(model: nn.Module, model_sd: dict, optim_sd: dict | None = None) -> tuple[dict, dict | None]:
    """``model_sd`` (``model.state_dict()`` or torch's ``get_state_dict``) and ``optim_sd`` (torch's
    ``get_state_dict`` format: fully qualified names) with every fused projection's segments as its one
    single-process weight; new dicts, sharing the tensors. Unchanged for a model without TP."""
    fused = fused_modules(model)
    if not fused:
        return model_sd, optim_sd
    model_sd = dict(model_sd)
    for prefix, module in fused.items():
        keys = _keys(prefix, module)
        if any(k in model_sd for k in keys):  # absent on ranks > 0 of a full state dict with cpu_offload
            model_sd[f"{prefix}.weight"] = _plain(module, [model_sd.pop(k) for k in keys])
    if optim_sd is None:
        return model_sd, None
    state, groups = dict(optim_sd["state"]), [dict(g, params=list(g["params"])) for g in optim_sd["param_groups"]]
    for prefix, module in fused.items():
        keys, fqn = _keys(prefix, module), f"{prefix}.weight"
        if keys[0] in state:
            per = [state.pop(k) for k in keys]
            shape = getattr(module, f"weight_{module.segments[0].name}").shape
            state[fqn] = {name: _plain(module, [p[name] for p in per])
                          if isinstance(value, torch.Tensor) and value.shape == shape else value
                          for name, value in per[0].items()}
        for group in groups:
            if keys[0] in group["params"]:
                at = group["params"].index(keys[0])
                group["params"] = [p for p in group["params"] if p not in keys]
                group["params"].insert(at, fqn)
    return model_sd, {**optim_sd, "state": state, "param_groups": groups}


def from_plain(model: nn.Module, model_plain: dict, optim_plain: dict | None, model_sd: dict,
               optim_sd: dict | None = None) -> tuple[dict, dict | None]:
    """After DCP loaded into ``to_plain(model, model_sd, optim_sd)``'s dicts: the state dicts in the
    model's own (segment) names, holding what was loaded, for ``set_state_dict``/``load_state_dict``."""
    fused = fused_modules(model)
    if not fused:
        return model_plain, optim_plain
    plain_keys = {f"{prefix}.weight" for prefix in fused}
    model_out = {k: v for k, v in model_plain.items() if k not in plain_keys}
    for prefix, module in fused.items():
        model_out.update({k: model_sd[k] for k in _keys(prefix, module) if k in model_sd})
    if optim_plain is None:
        return model_out, None
    if optim_sd is None:
        raise ValueError("from_plain needs the optimizer state dict that to_plain was given (optim_sd) to load "
                         "the optimizer's state into")
    state = {k: v for k, v in optim_plain["state"].items() if k not in plain_keys}
    groups = [dict(g, params=list(g["params"])) for g in optim_plain["param_groups"]]
    for prefix, module in fused.items():
        keys, fqn = _keys(prefix, module), f"{prefix}.weight"
        if fqn in optim_plain["state"]:
            merged = optim_plain["state"][fqn]
            for key in keys:  # the views were loaded in place; the rest (Adam's step) goes to every segment
                seg_state = optim_sd["state"][key]
                for name, value in merged.items():
                    if isinstance(value, PlainRows):
                        continue
                    if isinstance(value, torch.Tensor) and isinstance(seg_state.get(name), torch.Tensor):
                        if seg_state[name] is not value:
                            seg_state[name].copy_(value)
                    else:
                        seg_state[name] = value
                state[key] = seg_state
        for group in groups:
            if fqn in group["params"]:
                at = group["params"].index(fqn)
                group["params"][at:at + 1] = keys
    return model_out, {**optim_plain, "state": state, "param_groups": groups}
