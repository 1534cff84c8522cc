"""Host side of the FlashTPA decode kernels: launch plans, kernel handles, workspaces, the torch op.

An eager decode call must cost little host time: a small model's decode step calls the op once per
layer, and every call that reads less than a few hundred MB is bound by it. So everything that
depends only on the call's shapes is computed once per launch configuration and kept in a
:class:`DecodePlan`:

- the launch parameters (:func:`tpa.ops.decode.default_config`), the grids, every scalar kernel
  argument (strides, scales) and every constexpr, in the kernels' argument order;
- the compiled kernels' handles: after a plan's first launch through ``triton.jit`` (which binds
  and specialises the arguments, the part of a Triton launch that costs the most host time), later
  launches call the compiled kernel's launcher directly with the run-time arguments: the tensors'
  pointers as integers (read once per call by tpa_decode, see below; the launcher then skips its own
  ``data_ptr()`` call and driver query per pointer) before the pre-assembled scalars and constexprs
  (:func:`launcher_of`: with Triton 3.5 and 3.6, whose ``CudaLauncher.__call__`` only passes its
  arguments on, Triton's C launcher itself).
  A plan is keyed by everything the specialisation depends on (shapes, strides, dtypes, devices and
  the 16-byte alignment of every pointer), so the handle it keeps is the one ``triton.jit`` would
  pick; a launch hook (a profiler) or a current device other than the inputs' sends the call
  through ``triton.jit`` again;
- the workspace of the split partials (``O_part``, ``LSE_part``, float32), one per CUDA stream, reused
  by the plan's calls on that stream (which are ordered after each other) instead of allocated per
  call. During CUDA-graph capture a call allocates its own (the graph keeps it), so a captured graph
  never shares storage with eager calls.

Plans live in a table (:data:`PLANS`, :func:`clear_plans`) of at most ``MAX_PLANS`` entries, the
oldest evicted first (a hit costs no bookkeeping; an evicted key that comes back is planned again),
keyed by :func:`tpa.ops.decode.tpa_decode` (which also keeps there the entries of calls that run the
reference twin).

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
from torch._subclasses.fake_tensor import is_fake

from tpa.ops.triton_support import HAVE_TRITON, launch_hooks_active, next_pow2

__all__ = ["MAX_PLANS", "PLANS", "DecodePlan", "clear_plans"]

_LOG2E = 1.4426950408889634
MAX_PLANS = 128
PLANS: OrderedDict = OrderedDict()  # call key -> entry holding its DecodePlan (see tpa.ops.decode.tpa_decode)
RECENT: list = [None]  # the entry of the last keyed call, which a repeat of that call finds without its key


def clear_plans() -> None:
    """Forget every plan (their kernel handles and workspaces)."""
    PLANS.clear()
    RECENT[0] = None


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
        fast_run: the launch through them (:func:`_fast_runner`), or None (no handles yet, poisoned buffers).
        workspace_shapes: ``(O_part [B, N, H, S, E], LSE_part [B, N, H, S])``, float32.

    :meth:`run` launches it on inputs validated for it through ``triton.jit``; :attr:`fast_run` (once
    the handles exist) through the handles.
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
        tiles = math.ceil(h / cfg.block_h) * math.ceil(n / cfg.block_n)
        self.split_grid = (tiles, s, bsz) if options.heads_inner else (s, tiles, bsz)
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
            OFFS_64=(not paged) and needs_int64_offsets(caches, capacity),
            EARLY_LAUNCH=early, A_HEADS=_readable_heads(h, options.a_head_pad, a_k, a_v),
            HEADS_INNER=options.heads_inner, A_ALIGN=a_row_alignment(a_k, a_v), TIMELINE=options.timeline,
            A_DOT=options.a_dot and b_k.element_size() == 2,
        )
        self.times = None  # with options.timeline: int64 [programs, 5] (see the split kernel), rewritten per call
        if options.timeline:
            if interpret:
                raise ValueError("DecodeLaunchOptions.timeline reads the GPU's clock: it needs CUDA tensors")
            self.times = torch.zeros(math.prod(self.split_grid), 5, dtype=torch.int64, device=self.device)
        self.split_options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.max_registers is not None:
            self.split_options["maxnreg"] = cfg.max_registers
        slab = merge_slab(block_e, s, options.heuristic.merge_program_bytes)
        self.merge_grid = (bsz * n * h, block_e // slab)
        block_s = next_pow2(s)
        self.merge_scalars = (s, 1.0 / r_v)
        self.merge_constexprs = dict(
            E=e, BLOCK_S=block_s, CHUNK_S=max(1, min(block_s, 4096 // slab)), BLOCK_E=slab,
            WRITE_LSE=return_lse, FIX_BF16=fix_bf16, PDL=self.pdl,
        )
        self.merge_options = dict(num_warps=4, **({"launch_pdl": True} if self.pdl else {}))
        # every argument after the tensors, in signature order: what a compiled handle takes
        self.split_tail = (*self.split_scalars, *self.split_constexprs.values())
        self.merge_tail = (*self.merge_scalars, *self.merge_constexprs.values())
        self.device_index = self.device.index  # CUDA tensors always name theirs; None on the CPU
        self.fast_run = None  # the handles' launch closure (:func:`_fast_runner`), once both handles exist
        self._split_handle = self._merge_handle = None
        self._workspaces: dict[int, tuple] = {}

    @property
    def split_handle(self):
        """The split kernel's compiled kernel (None until the plan's first compiled launch)."""
        return self._split_handle

    @split_handle.setter
    def split_handle(self, compiled) -> None:
        self._split_handle = compiled
        self._update_fast_run()

    @property
    def merge_handle(self):
        """The merge kernel's compiled kernel (None until the plan's first compiled launch)."""
        return self._merge_handle

    @merge_handle.setter
    def merge_handle(self, compiled) -> None:
        self._merge_handle = compiled
        self._update_fast_run()

    def _update_fast_run(self) -> None:
        ready = self._split_handle is not None and (self.num_splits == 1 or self._merge_handle is not None)
        self.fast_run = _fast_runner(self) if ready and not (self.poison or self.times is not None) else None

    def workspace(self, stream: int) -> tuple:
        """``(O_part, LSE_part, O_part.data_ptr(), LSE_part.data_ptr())`` for a call on ``stream``: the
        plan's own for that stream, or a fresh pair during CUDA-graph capture (the graph keeps it)
        and with poisoned buffers."""
        fresh = self.poison or (self.compiled and _is_capturing())
        ws = None if fresh else self._workspaces.get(stream)
        if ws is None:
            ws = _new_workspace(self.workspace_shapes, self.device, self.poison, None if fresh else self._workspaces,
                                stream)
        return ws

    def run(self, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out=None):
        """Run the plan on inputs validated for it, through ``triton.jit`` (which binds, specialises
        and calls the launch hooks), keeping the compiled kernels it returns as the plan's handles
        (CUDA, Triton >= 3.3; later calls launch through :attr:`fast_run`). Returns ``out [B, N, H, E]``
        (given or new), with ``return_lse`` ``(out, lse [B, N, H] float32)``. No host sync."""
        if out is None:
            out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
            if self.poison:
                out.fill_(float("nan"))
        lse = None
        if self.return_lse:
            lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
            if self.poison:
                lse.fill_(float("nan"))
        stream = 0
        if self.compiled:
            get_device, get_stream = _stream_getters()
            stream = get_stream(get_device())
        o_part, lse_part = self.workspace(stream)[:2] if self.num_splits > 1 else (out, out)  # unused with one split
        lse_arg = out if lse is None else lse  # unused when not WRITE_LSE
        bt = lens if table is None else table  # unused when not PAGED
        split_kernel, merge_kernel = _kernels()
        times = lse_part if self.times is None else self.times  # unused when not TIMELINE
        compiled = split_kernel[self.split_grid](a_q, b_q, a_k, b_k, a_v, b_v, lens, bt, out, lse_arg, o_part, lse_part,
                                                 times, *self.split_scalars, **self.split_constexprs,
                                                 **self.split_options)
        keep = self.compiled and _handles_supported()
        if keep and hasattr(compiled, "packed_metadata"):
            self.split_handle = compiled
        if self.num_splits > 1:
            compiled = merge_kernel[self.merge_grid](o_part, lse_part, out, lse_arg, *self.merge_scalars,
                                                     **self.merge_constexprs, **self.merge_options)
            if keep and hasattr(compiled, "packed_metadata"):
                self.merge_handle = compiled
        return (out, lse) if self.return_lse else out


def needs_int64_offsets(caches, capacity: int) -> bool:
    """Whether an element of one sequence of a contiguous (unpaged) cache ``[B, M, R, X]`` (any strides:
    token-major buffers, rank-major views) can lie 2^31 or more elements past the sequence's start, so
    the kernel must form its token and rank offsets in int64 (``OFFS_64``)."""
    for c in caches:
        extent = (capacity - 1) * abs(c.stride(1)) + sum((size - 1) * abs(stride)
                                                        for size, stride in zip(c.shape[2:], c.stride()[2:]))
        if extent >= 2**31 - 1:
            return True
    return False


_MAX_ROW_ALIGNMENT = 16  # elements; a load is at most 16 bytes wide


def a_row_alignment(*a_caches: torch.Tensor) -> int:
    """The largest power of two (at most 16) in elements dividing every offset between the starts of
    the head-factor rows ``[..., R, H]`` of these caches (``[B, M, R, H]``, or paged
    ``[blocks, block_size, R, H]``): the split kernel's ``A_ALIGN``. 1 unless the head stride is 1.

    A contiguous cache's strides are all multiples of H, so H stands for them (under
    ``torch.compile`` the capacity may be a symbolic size, and this needs no guard on it); otherwise
    the strides of dimensions 0-2 of size > 1 count (one of size 1 is only indexed at 0)."""
    align = _MAX_ROW_ALIGNMENT
    for t in a_caches:
        if t.stride(3) != 1:
            return 1
        if t.is_contiguous():
            align = math.gcd(align, t.shape[3])
            continue
        for dim in (0, 1, 2):
            if t.shape[dim] != 1:
                align = math.gcd(align, t.stride(dim))
    return align


def _readable_heads(h: int, pad: int, *a_caches) -> int:
    """Heads per row the kernel's loads of the A caches may read: ``h``, or with ``pad`` > 1
    ``ceil(h / pad) * pad`` once every cache has unit head stride and storage for that many heads in
    its last row (a view ``buf[..., :h]`` of a wider buffer). Raises ValueError otherwise.

    Under ``torch.compile`` the op is traced with fake tensors, which hold the view alone: the room
    behind a view's last head cannot be checked there, so traced calls read ``h`` heads (right for
    any layout); the padded reads serve eager calls and CUDA-graph replays."""
    if pad == 1 or any(map(is_fake, a_caches)):
        return h
    heads = -(-h // pad) * pad
    for name, t in zip(("a_k_cache", "a_v_cache"), a_caches):
        if not _padded_view(t, h, heads):
            raise ValueError(
                f"tpa_decode: a_head_pad={pad} reads {heads} heads per row of {name}, which must then be a view "
                f"buf[..., :{h}] of a buffer of at least {heads} heads (unit head stride); got shape "
                f"{tuple(t.shape)}, strides {t.stride()}, {_room(t)} elements of storage from its last head on"
            )
    return heads


def _room(t: torch.Tensor) -> int:
    """Elements of ``t``'s storage from its last element on."""
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() // t.element_size() - last


def _padded_view(t: torch.Tensor, h: int, heads: int) -> bool:
    """Whether ``t [.., R, h]`` has unit head stride and ``heads`` readable heads in every row."""
    return t.stride(3) == 1 and _room(t) >= heads - (h - 1) and (t.shape[2] == 1 or t.stride(2) >= heads)


def padded_reads_possible(h: int, pad: int, *a_caches: torch.Tensor) -> bool:
    """Whether :func:`_readable_heads` accepts ``a_head_pad=pad`` for these (real) A caches."""
    heads = -(-h // pad) * pad
    return pad == 1 or all(_padded_view(t, h, heads) for t in a_caches)


def merge_slab(block_e: int, num_splits: int, program_bytes: int) -> int:
    """Output columns per merge program: all ``block_e`` of a row, halved (down to 16) while one
    program would read more than ``program_bytes`` of partial outputs (``num_splits`` float32 rows of
    that many columns). A merge program is bound by memory latency, so a row of many splits is
    merged faster by several programs side by side (H200, 2026-12-03, B=1, H=32, 512 splits: 8.3 us
    with one program per row, 3.2 us in slabs of 16; BENCHMARKS.md, "the merge in slabs")."""
    slab = block_e
    while slab > 16 and num_splits * slab * 4 > program_bytes:
        slab //= 2
    return slab


def _new_workspace(shapes, device, poison, store, stream) -> tuple:
    """A fresh ``(O_part, LSE_part, O_part.data_ptr(), LSE_part.data_ptr())`` of ``shapes``, float32,
    NaN-filled with ``poison``, kept in ``store[stream]`` unless ``store`` is None."""
    o_part = torch.empty(shapes[0], dtype=torch.float32, device=device)
    lse_part = torch.empty(shapes[1], dtype=torch.float32, device=device)
    if poison:
        o_part.fill_(float("nan"))
        lse_part.fill_(float("nan"))
    ws = (o_part, lse_part, o_part.data_ptr(), lse_part.data_ptr())
    if store is not None:
        store[stream] = ws
    return ws


def _fast_runner(plan: DecodePlan):
    """The launch of ``plan`` through its compiled handles as one closure over everything that does not
    change between calls (grids, scalars, constexprs, handles, output shapes, the workspace table),
    with the argument lists pre-assembled but for the pointers, the stream and the workspace.

    ``run(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr)`` takes the call's
    validated inputs with their pointers as integers (``ptrs``: ``a_q``, ``b_q``, the four caches,
    ``lens`` and ``table``, ``lens``'s again without one; ``out_ptr``: ``out``'s, ignored when ``out``
    is None): the launcher then neither calls ``data_ptr()`` nor asks the driver about each pointer
    (the inputs' devices were validated). A call with a launch hook set (a profiler) or another
    current device than the inputs' goes through ``entry.plan.run`` (``triton.jit``) instead. It holds
    no reference to the plan (nor the plan to an entry), so a dropped plan is freed at once."""
    split_launch, split_fixed = launcher_of(plan.split_handle)
    merged = plan.num_splits > 1
    merge_launch, merge_fixed = launcher_of(plan.merge_handle) if merged else (None, None)
    g0, g1, g2 = plan.split_grid
    m0, m1 = plan.merge_grid
    split_tail, merge_tail = plan.split_tail, plan.merge_tail
    out_shape, lse_shape, dtype, device = plan.out_shape, plan.lse_shape, plan.dtype, plan.device
    return_lse, compiled, device_index = plan.return_lse, plan.compiled, plan.device_index
    workspaces, ws_shapes = plan._workspaces, plan.workspace_shapes
    # (a CPU plan gets handles only from tests and scripts/decode_host_cost.py)
    get_device, get_stream = _stream_getters() if compiled else (lambda: device_index, lambda device: 0)
    empty, float32 = torch.empty, torch.float32

    def run(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr):
        current = get_device()
        if current != device_index or launch_hooks_active():
            return entry.plan.run(a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out)
        stream = get_stream(current)
        if out is None:
            out = empty(out_shape, dtype=dtype, device=device)
            out_ptr = out.data_ptr()
        lse = None
        lse_ptr = out_ptr  # unused when not WRITE_LSE
        if return_lse:
            lse = empty(lse_shape, dtype=float32, device=device)
            lse_ptr = lse.data_ptr()
        if merged:
            capturing = compiled and _is_capturing()
            ws = None if capturing else workspaces.get(stream)
            if ws is None:
                ws = _new_workspace(ws_shapes, device, False, None if capturing else workspaces, stream)
            o_ptr, l_ptr = ws[2], ws[3]
            split_launch(g0, g1, g2, stream, *split_fixed, *ptrs, out_ptr, lse_ptr, o_ptr, l_ptr, l_ptr, *split_tail)
            merge_launch(m0, m1, 1, stream, *merge_fixed, o_ptr, l_ptr, out_ptr, lse_ptr, *merge_tail)
        else:
            split_launch(g0, g1, g2, stream, *split_fixed, *ptrs, out_ptr, lse_ptr, out_ptr, out_ptr, out_ptr,
                         *split_tail)
        return (out, lse) if return_lse else out

    return run


@functools.lru_cache(maxsize=1)
def _direct_launch_supported() -> bool:
    """Whether this Triton's ``CudaLauncher.__call__`` is the one of Triton 3.5 and 3.6, which only
    prepends its scratch buffers (None without them) and launch flags to the arguments it is given
    before calling its C launcher."""
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) in ((3, 5), (3, 6))


def launcher_of(handle) -> tuple:
    """``(launch, fixed)``: ``launch(grid_x, grid_y, grid_z, stream, *fixed, *kernel_args)`` launches the
    compiled kernel ``handle``. Where :func:`_direct_launch_supported` and the kernel needs no scratch
    memory, ``launch`` is Triton's C launcher itself, with the launch flags and the empty scratch
    pointers in ``fixed`` (what ``CudaLauncher.__call__`` would pass: that Python call costs about a
    microsecond per launch); otherwise it is ``handle.run``."""
    run = handle.run
    direct = (_direct_launch_supported() and type(run).__name__ == "CudaLauncher"
              and getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0
              and callable(getattr(run, "launch", None)))
    if direct:
        return run.launch, (handle.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                            handle.packed_metadata, None, None, None)
    return run, (handle.function, handle.packed_metadata, None, None, None)


@functools.lru_cache(maxsize=1)
def _stream_getters():
    """``(get_current_device, get_current_stream)`` as ``triton.jit`` finds them, so that a handle
    launches where ``triton.jit`` would: Triton's own getters, with torch's ``_cuda_getDevice`` for
    the device (what ``torch.cuda.current_device`` returns once CUDA is initialised, as it is wherever
    a CUDA tensor exists, without its Python)."""
    from triton.runtime import driver

    get_device = getattr(torch._C, "_cuda_getDevice", None) or driver.active.get_current_device
    return get_device, driver.active.get_current_stream


# whether the current CUDA stream is capturing a graph (called on compiled plans only)
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing


# --------------------------------------------------------------------------------------------
# torch.compile: ``tpa::decode`` as a triton_op (inductor emits the launches itself)
# --------------------------------------------------------------------------------------------


_A_HEAD_PAD_AT = 12  # the index of DecodeLaunchOptions.a_head_pad in config_to_list's list
_MAX_REGISTERS_AT = 15  # ... and of DecodeConfig.max_registers
_SPLITS_AT = 16  # ... and of DecodeHeuristic.splits (1: "waves"), wave_fill_margin (in 1/10000), max_splits,
#   long_split_blocks, merge_program_bytes, rank_four_half_blocks, then DecodeLaunchOptions.a_dot


def config_to_list(cfg, options) -> list[int]:
    """The op's ``config`` argument: the launch parameters a caller fixed (``cfg``, a
    :class:`tpa.ops.decode.DecodeConfig`, -1 for a field left to the heuristic), the poison flag, the
    heuristic's constants, the A rows' padding and the grid order (``options``, a
    :class:`tpa.ops.decode.DecodeLaunchOptions`), then the register cap (-1: none), then the split
    rule, its wave-fill margin (in units of 1/10000), the heuristic's most splits, the split
    length past which it may take more, the merge program's most bytes, the rank-4 half-block flag and
    the head factors' path (``options.a_dot``)."""
    fixed = [-1 if v is None else v for v in (cfg.block_m, cfg.block_h, cfg.block_n, cfg.num_splits, cfg.num_warps,
                                              cfg.num_stages)]
    h = options.heuristic
    return [*fixed, int(options.poison_buffers), int(h.warps == "rows"), h.block_m, h.num_stages, h.programs_per_sm,
            h.min_split_blocks, options.a_head_pad, int(options.heads_inner), int(h.head_blocks == "least_padding"),
            -1 if cfg.max_registers is None else cfg.max_registers, int(h.splits == "waves"),
            round(h.wave_fill_margin * 10000), h.max_splits, h.long_split_blocks, h.merge_program_bytes,
            int(h.rank_four_half_blocks), int(options.a_dot)]


@functools.lru_cache(maxsize=64)
def _config_from_list(config: tuple[int, ...], launched_by_inductor: bool):
    """``(DecodeConfig, DecodeLaunchOptions)`` of an op's ``config`` list (one object per distinct list:
    the eager op keys its plans by the options' identity). Inductor's launches use no programmatic
    dependent launch."""
    from tpa.ops.decode import DecodeConfig, DecodeHeuristic, DecodeLaunchOptions

    fixed = DecodeConfig(*(None if v < 0 else v for v in (*config[:6], config[_MAX_REGISTERS_AT])))
    heuristic = DecodeHeuristic("rows" if config[7] else "fixed", *config[8:12],
                                head_blocks="least_padding" if config[14] else "pow2",
                                splits="waves" if config[_SPLITS_AT] else "programs",
                                wave_fill_margin=config[_SPLITS_AT + 1] / 10000, max_splits=config[_SPLITS_AT + 2],
                                long_split_blocks=config[_SPLITS_AT + 3], merge_program_bytes=config[_SPLITS_AT + 4],
                                rank_four_half_blocks=bool(config[_SPLITS_AT + 5]))
    pdl = {"use_pdl": False, "early_launch": False} if launched_by_inductor else {}
    options = DecodeLaunchOptions(heuristic=heuristic, poison_buffers=bool(config[6]),
                                  a_head_pad=config[_A_HEAD_PAD_AT],
                                  heads_inner=bool(config[13]), a_dot=bool(config[_SPLITS_AT + 6]), **pdl)
    return fixed, options


def _plan_from_list(a_q, b_q, a_k, b_k, a_v, b_v, block_table, softmax_scale, return_lse, config) -> DecodePlan:
    """The plan of an op call (launch parameters chosen here, from shapes: the op's body is traced
    by inductor as plain Python, where dynamo would have to trace the heuristic)."""
    from tpa.ops.decode import _num_sms, default_config

    fixed, options = _config_from_list(tuple(config), True)
    heuristic = options.heuristic
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
    # every pointer argument its own tensor: the functional form of a wrap_triton launch copies each
    # mutated argument apart, so a tensor passed twice (the output as its own unused workspace) would
    # be written through one copy and read back through another (a compiled step read zeros)
    unused = functools.partial(torch.empty, 1, dtype=torch.float32, device=plan.device)
    if plan.num_splits > 1:
        o_part = torch.empty(plan.workspace_shapes[0], dtype=torch.float32, device=plan.device)
        lse_part = torch.empty(plan.workspace_shapes[1], dtype=torch.float32, device=plan.device)
    else:
        o_part, lse_part = unused(), unused()
    lse_arg = lse if return_lse else unused()
    bt = cache_seqlens if block_table is None else block_table
    wrap_triton(split_kernel)[plan.split_grid](
        a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, bt, out, lse_arg, o_part, lse_part, unused(),
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


def _register_strided_op():
    """``tpa::decode_strided``, an opaque ``custom_op`` for calls with a non-contiguous input (views of
    a projection's output, padded or expanded caches). A ``triton_op``'s launch arguments, strides
    included, are fixed when inductor traces it, and inductor may hand the compiled kernel a tensor
    laid out otherwise (it keeps the order of the strides, not their values: a padded view's copy, or
    a materialised stride-0 view). This op's implementation is the eager call, which reads the strides
    of the tensors it gets. Returns the op."""
    from torch.library import custom_op

    @custom_op("tpa::decode_strided", mutates_args=())
    def decode_strided(
        a_q: torch.Tensor, b_q: torch.Tensor, a_k: torch.Tensor, b_k: torch.Tensor, a_v: torch.Tensor,
        b_v: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor | None, softmax_scale: float,
        return_lse: bool, config: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from tpa.ops.decode import tpa_decode

        pad = config[_A_HEAD_PAD_AT]
        if pad > 1 and not padded_reads_possible(a_q.shape[-1], pad, a_k, a_v):
            config = [*config[:_A_HEAD_PAD_AT], 1, *config[_A_HEAD_PAD_AT + 1:]]  # inductor passed a copy: read H heads
        fixed, options = _config_from_list(tuple(config), False)
        out, lse = tpa_decode(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table=block_table,
                              softmax_scale=softmax_scale, return_lse=True, backend="triton", check_lengths=False,
                              config=fixed, options=options)
        return out, (lse if return_lse else lse.new_empty(0))

    @decode_strided.register_fake
    def _(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, softmax_scale, return_lse, config):
        bsz, n, _, h = a_q.shape
        out = b_q.new_empty(bsz, n, h, b_v.shape[-1])
        lse = a_q.new_empty((bsz, n, h) if return_lse else (0,), dtype=torch.float32)
        return out, lse

    return decode_strided


DECODE_OP = _register_op() if HAVE_TRITON else None
DECODE_STRIDED_OP = _register_strided_op() if HAVE_TRITON else None
