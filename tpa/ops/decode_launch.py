"""Host side of the FlashTPA decode kernels: launch plans, kernel handles, workspaces, the torch op.

An eager decode call must cost little host time: a small model's decode step calls the op once per
layer, and every call that reads less than a few hundred MB is bound by it. So everything that
depends only on the call's shapes is computed once per launch configuration and kept in a
:class:`DecodePlan`:

- the launch parameters (:func:`tpa.ops.decode.default_config`), the grids, every scalar kernel
  argument (strides, scales) and every constexpr, in the kernels' argument order;
- the compiled kernels' handles: after a plan's first launch through ``triton.jit`` (which binds
  and specialises the arguments, the part of a Triton launch that costs the most host time), later
  launches call the compiled kernel's launcher directly with the run-time arguments. A plan is
  keyed by everything the specialisation depends on (shapes, strides, dtypes, devices and the
  16-byte alignment of every pointer), so the handle it keeps is the one ``triton.jit`` would pick;
- the workspace of the split partials (``O_part``, ``LSE_part``, float32), one per CUDA stream, reused
  by the plan's calls on that stream (which are ordered after each other) instead of allocated per
  call. During CUDA-graph capture a call allocates its own (the graph keeps it), so a captured graph
  never shares storage with eager calls.

Plans live in an LRU table (:data:`PLANS`, :func:`clear_plans`) of at most ``MAX_PLANS`` entries.

Under ``torch.compile`` the op is ``torch.ops.tpa.decode``, a ``torch.library.triton_op``:
inductor sees the two kernel launches (through ``wrap_triton``) and emits them into its generated
code with its own launcher and buffers, without this module's Python at run time. That path
allocates its workspace per call (inductor plans the buffer) and does not use programmatic
dependent launch.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch

from tpa.ops.triton_support import HAVE_TRITON, launch_hooks_active, next_pow2

__all__ = ["MAX_PLANS", "PLANS", "DecodePlan", "clear_plans", "launch_plan"]

_LOG2E = 1.4426950408889634
MAX_PLANS = 128
PLANS: OrderedDict = OrderedDict()  # call key -> DecodePlan (see tpa.ops.decode._call_key)


def clear_plans() -> None:
    """Forget every plan (their kernel handles and workspaces)."""
    PLANS.clear()


@functools.lru_cache(maxsize=1)
def _kernels():
    from tpa.ops.kernels.decode import tpa_decode_merge_kernel, tpa_decode_split_kernel

    return tpa_decode_split_kernel, tpa_decode_merge_kernel


@functools.lru_cache(maxsize=1)
def _handles_supported() -> bool:
    """Compiled-kernel launchers take every argument in signature order from Triton 3.3 on."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3)


@functools.lru_cache(maxsize=16)
def _pdl_supported(device_index: int) -> bool:
    import triton.language as language

    return torch.cuda.get_device_capability(device_index)[0] >= 9 and hasattr(language.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=16)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class DecodePlan:
    """Everything about one launch configuration that does not change between its calls.

    Built from validated inputs (see :func:`tpa.ops.decode.tpa_decode` for the shapes); ``cfg`` is
    the :class:`tpa.ops.decode.DecodeConfig` with every field filled, ``options`` the
    :class:`tpa.ops.decode.DecodeLaunchOptions`.

    Attributes:
        out_shape, lse_shape: ``[B, N, H, E]`` and ``[B, N, H]``; dtype, device: of the output.
        num_splits: KV splits (1: the split kernel writes the output, no merge launch).
        split_grid, merge_grid: launch grids.
        split_scalars, merge_scalars: the non-tensor run-time arguments and constexprs, in order.
        split_handle, merge_handle: compiled kernels after the first launch (CUDA, Triton >= 3.3).
        workspace_shapes: ``(O_part [B, N, H, S, E], LSE_part [B, N, H, S])``, float32.
    """

    def __init__(self, a_q, b_q, a_k, b_k, a_v, b_v, block_table, softmax_scale, return_lse, cfg, options):
        bsz, n, r_q, h = a_q.shape
        d = b_q.shape[-1]
        r_k, r_v, e = a_k.shape[2], a_v.shape[2], b_v.shape[-1]
        paged = block_table is not None
        page_size = a_k.shape[1] if paged else 1
        capacity = block_table.shape[1] * page_size if paged else a_k.shape[1]
        self.device = a_q.device
        self.dtype = a_q.dtype
        interpret = self.device.type != "cuda"
        self.compiled = not interpret
        self.poison = options.poison_buffers
        self.out_shape, self.lse_shape = (bsz, n, h, e), (bsz, n, h)
        self.return_lse = return_lse
        self.num_splits = s = cfg.num_splits
        self.workspace_shapes = ((bsz, n, h, s, e), (bsz, n, h, s)) if s > 1 else None
        self.cfg = cfg

        fix_bf16 = interpret and a_q.dtype == torch.bfloat16
        block_e = max(16, next_pow2(e))
        self.split_grid = (s, math.ceil(h / cfg.block_h) * math.ceil(n / cfg.block_n), bsz)
        dev_index = self.device.index if self.device.index is not None else (0 if interpret else torch.cuda.current_device())
        self.pdl = s > 1 and options.use_pdl and not interpret and _pdl_supported(dev_index)
        early = self.pdl and options.early_launch and math.prod(self.split_grid) <= (
            num_sms(dev_index) if not interpret else 4)
        caches = (a_k, b_k, a_v, b_v)
        strides = (*a_q.stride(), *b_q.stride(), *(x for c in caches for x in c.stride()))
        self.split_scalars = (
            n, capacity, s, softmax_scale * _LOG2E / (r_q * r_k), 1.0 / r_v,
            *strides, block_table.stride(0) if paged else 0,
        )
        self.split_constexprs = dict(
            H=h, D=d, E=e, R_Q=r_q, R_K=r_k, R_V=r_v, R_PAD=max(next_pow2(r_q), 16 // cfg.block_n),
            BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
            BLOCK_D=max(16, next_pow2(d)), BLOCK_E=block_e,
            SPLIT=s > 1, PAGED=paged, PAGE_SIZE=page_size,
            # float32 factors: exact float32 products (no tf32). Under the interpreter every dot runs in
            # float32 on operands already rounded to the cache dtype (its bf16 dot is broken), which
            # equals a tensor-core dot with float32 accumulation up to summation order.
            WRITE_LSE=return_lse, IEEE_DOT=interpret or b_k.dtype == torch.float32, FIX_BF16=fix_bf16,
            OFFS_64=(not paged) and capacity * max(abs(c.stride(1)) for c in caches) >= 2**31,
            EARLY_LAUNCH=early,
        )
        self.split_options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.merge_grid = (bsz * n * h,)
        block_s = next_pow2(s)
        self.merge_scalars = (s, 1.0 / r_v)
        self.merge_constexprs = dict(
            E=e, BLOCK_S=block_s, CHUNK_S=max(1, min(block_s, 4096 // block_e)), BLOCK_E=block_e,
            WRITE_LSE=return_lse, FIX_BF16=fix_bf16, PDL=self.pdl,
        )
        self.merge_options = dict(num_warps=4, **({"launch_pdl": True} if self.pdl else {}))
        # every argument after the tensors, in signature order: what a compiled handle takes
        self.split_tail = (*self.split_scalars, *self.split_constexprs.values())
        self.merge_tail = (*self.merge_scalars, *self.merge_constexprs.values())
        self.split_handle = self.merge_handle = None
        self._workspaces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def workspace(self, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(O_part, LSE_part)`` for a call on ``stream``: the plan's own for that stream, or a fresh
        pair during CUDA-graph capture (the graph keeps it) and with poisoned buffers."""
        fresh = self.poison or (self.compiled and torch._C._cuda_isCurrentStreamCapturing())
        ws = None if fresh else self._workspaces.get(stream)
        if ws is None:
            o_shape, l_shape = self.workspace_shapes
            ws = (torch.empty(o_shape, dtype=torch.float32, device=self.device),
                  torch.empty(l_shape, dtype=torch.float32, device=self.device))
            if self.poison:
                ws[0].fill_(float("nan"))
                ws[1].fill_(float("nan"))
            elif not fresh:
                self._workspaces[stream] = ws
        return ws


@functools.lru_cache(maxsize=1)
def _stream_getters():
    """Triton's own ``(get_current_device, get_current_stream)``: a handle launches where
    ``triton.jit`` would."""
    from triton.runtime import driver

    return driver.active.get_current_device, driver.active.get_current_stream


def _current_stream(plan: DecodePlan) -> int:
    if not plan.compiled:
        return 0
    device, stream = _stream_getters()
    return stream(device())


def launch(kernel, plan: DecodePlan, which: str, grid: tuple, tensors: tuple, stream: int) -> None:
    """Launch ``kernel`` (``which``: ``"split"`` or ``"merge"``) of ``plan`` over ``grid``: through its
    compiled handle when the plan has one (and no Triton launch hook is set), else through
    ``triton.jit``, keeping the compiled kernel it returns as the handle."""
    handle = plan.split_handle if which == "split" else plan.merge_handle
    if handle is not None and not launch_hooks_active():
        g0, g1, g2 = plan.split_grid if which == "split" else (*plan.merge_grid, 1, 1)
        tail = plan.split_tail if which == "split" else plan.merge_tail
        handle.run(g0, g1, g2, stream, handle.function, handle.packed_metadata, None, None, None, *tensors, *tail)
        return
    if which == "split":
        compiled = kernel[grid](*tensors, *plan.split_scalars, **plan.split_constexprs, **plan.split_options)
    else:
        compiled = kernel[grid](*tensors, *plan.merge_scalars, **plan.merge_constexprs, **plan.merge_options)
    if plan.compiled and _handles_supported() and compiled is not None and hasattr(compiled, "packed_metadata"):
        setattr(plan, f"{which}_handle", compiled)


def launch_plan(plan: DecodePlan, a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, out=None):
    """Run ``plan`` on validated inputs: ``out [B, N, H, E]`` (given or new) and ``lse [B, N, H]``
    float32 (or None without ``return_lse``). No host sync: capturable in a CUDA graph."""
    split_kernel, merge_kernel = _kernels()
    device = plan.device
    if out is None:
        out = torch.empty(plan.out_shape, dtype=plan.dtype, device=device)
        if plan.poison:
            out.fill_(float("nan"))
    lse = None
    if plan.return_lse:
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=device)
        if plan.poison:
            lse.fill_(float("nan"))
    stream = _current_stream(plan)
    o_part, lse_part = plan.workspace(stream) if plan.num_splits > 1 else (out, out)  # unused with one split
    lse_arg = out if lse is None else lse  # unused when not WRITE_LSE
    bt = cache_seqlens if block_table is None else block_table  # unused when not PAGED
    launch(split_kernel, plan, "split", plan.split_grid,
           (a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, bt, out, lse_arg, o_part, lse_part), stream)
    if plan.num_splits > 1:
        launch(merge_kernel, plan, "merge", plan.merge_grid, (o_part, lse_part, out, lse_arg), stream)
    return out, lse


# --------------------------------------------------------------------------------------------
# torch.compile: ``tpa::decode`` as a triton_op (inductor emits the launches itself)
# --------------------------------------------------------------------------------------------


def config_to_list(cfg, options) -> list[int]:
    """The op's ``config`` argument: the launch parameters a caller fixed (``cfg``, a
    :class:`tpa.ops.decode.DecodeConfig`, -1 for a field left to the heuristic), the poison flag and
    the heuristic's constants (``options``, a :class:`tpa.ops.decode.DecodeLaunchOptions`)."""
    fixed = [-1 if v is None else v for v in (cfg.block_m, cfg.block_h, cfg.block_n, cfg.num_splits, cfg.num_warps,
                                              cfg.num_stages)]
    h = options.heuristic
    return [*fixed, int(options.poison_buffers), int(h.warps == "rows"), h.block_m, h.num_stages, h.programs_per_sm,
            h.min_split_blocks]


def _plan_from_list(a_q, b_q, a_k, b_k, a_v, b_v, block_table, softmax_scale, return_lse, config) -> DecodePlan:
    """The plan of an op call (launch parameters chosen here, from shapes: the op's body is traced
    by inductor as plain Python, where dynamo would have to trace the heuristic)."""
    from tpa.ops.decode import DecodeConfig, DecodeHeuristic, DecodeLaunchOptions, _num_sms, default_config

    fixed = DecodeConfig(*(None if v < 0 else v for v in config[:6]))
    heuristic = DecodeHeuristic("rows" if config[7] else "fixed", *config[8:12])
    options = DecodeLaunchOptions(heuristic=heuristic, use_pdl=False, early_launch=False, poison_buffers=bool(config[6]))
    bsz, n, _, h = a_q.shape
    capacity = block_table.shape[1] * a_k.shape[1] if block_table is not None else a_k.shape[1]
    cfg = default_config(bsz, n, h, b_q.shape[-1], b_v.shape[-1], capacity, _num_sms(a_q.device), b_k.element_size(),
                         fixed, a_k.shape[2], a_v.shape[2], heuristic=heuristic)
    return DecodePlan(a_q, b_q, a_k, b_k, a_v, b_v, block_table, softmax_scale, return_lse, cfg, options)


def _op_body(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, softmax_scale, return_lse, config):
    """The op's computation with ``wrap_triton`` launches and fresh buffers (what inductor traces)."""
    from torch.library import wrap_triton

    plan = _plan_from_list(a_q, b_q, a_k, b_k, a_v, b_v, block_table, softmax_scale, return_lse, config)
    split_kernel, merge_kernel = _kernels()
    out = torch.empty(plan.out_shape, dtype=plan.dtype, device=plan.device)
    lse = torch.empty(plan.lse_shape if return_lse else (0,), dtype=torch.float32, device=plan.device)
    if plan.poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if plan.num_splits > 1:
        o_part = torch.empty(plan.workspace_shapes[0], dtype=torch.float32, device=plan.device)
        lse_part = torch.empty(plan.workspace_shapes[1], dtype=torch.float32, device=plan.device)
    else:
        o_part = lse_part = out
    lse_arg = lse if return_lse else out
    bt = cache_seqlens if block_table is None else block_table
    wrap_triton(split_kernel)[plan.split_grid](
        a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, bt, out, lse_arg, o_part, lse_part,
        *plan.split_scalars, **plan.split_constexprs, **plan.split_options)
    if plan.num_splits > 1:
        wrap_triton(merge_kernel)[plan.merge_grid](
            o_part, lse_part, out, lse_arg, *plan.merge_scalars, **plan.merge_constexprs, num_warps=4)
    return out, lse


def _register_op():
    """``tpa::decode`` (at import, when triton is installed: torch.compile cannot register an op while
    tracing). Returns the op."""
    from torch.library import triton_op

    @triton_op("tpa::decode", mutates_args=())
    def decode_op(
        a_q: torch.Tensor, b_q: torch.Tensor, a_k: torch.Tensor, b_k: torch.Tensor, a_v: torch.Tensor,
        b_v: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor | None, softmax_scale: float,
        return_lse: bool, config: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _op_body(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, softmax_scale, return_lse, config)

    return decode_op


DECODE_OP = _register_op() if HAVE_TRITON else None
