"""FlashTPA decoding (the paper's Section 5, Algorithm 2 and Appendix B.1) as a Triton kernel.

The stack, bottom to top:

- :mod:`tpa.ops.kernels.decode` (``triton.jit``, imported only where Triton is installed):
  ``tpa_decode_split_kernel``, one program per (KV split, head/query tile, sequence). It forms the
  program's queries from their factors once (``Q = A_q^T B_q``, H x D per query, float32), then
  streams its slice of the factor cache in blocks of ``BLOCK_M`` tokens, never materialising K or V:
  per key rank, head-shared feature dots ``Q B_k^T`` (one matrix product for all heads) times the
  per-head factor ``a_k``; an online softmax in float32 (base 2); per value rank, the head-weighted
  probabilities ``p * a_v`` times ``B_v`` (a second matrix product). For 16-bit caches ``a_k`` and
  ``a_v`` reach the rows through a one-hot matrix product, which stages their loads in shared memory
  (:attr:`DecodeLaunchOptions.a_dot`). Accumulation, running max and
  running sum are float32. With one split it writes the final output; otherwise it writes a
  float32 partial output and log-sum-exp per split, which ``tpa_decode_merge_kernel`` merges with
  a float32 log-sum-exp (flash-decoding), one program per output row, or per slab of a row's
  columns where the row has many splits (:func:`tpa.ops.decode_launch.merge_slab`).
- :mod:`tpa.ops.decode_launch`: the host side. A :class:`~tpa.ops.decode_launch.DecodePlan` per
  launch configuration (launch parameters, grids, scalar arguments, compiled kernel handles, the
  split workspace), and ``torch.ops.tpa.decode``, the ``triton_op`` that ``torch.compile`` traces.
- here: :class:`DecodeConfig` (launch parameters), :class:`DecodeHeuristic` and
  :class:`DecodeLaunchOptions` (how they are chosen and launched), :func:`default_config`, and
  :func:`tpa_decode`, the public op: validates, fills defaults, dispatches to Triton or to the
  reference twin :func:`tpa.ops.naive.tpa_decode_reference`.

Host cost: an eager call that repeats the last one (tensors of the same classes, shapes, strides,
dtypes and devices, the same other arguments, pointers aligned to 16 bytes: every layer of a decode
step) finds its entry through that entry's guard, PyTorch's C++ ``TensorGuards`` check of the
tensors (about 1 us for nine tensors on a CPU where building the key takes 3 us). Any other call
looks its entry up by one dict lookup on a key of the same properties and of the pointers'
alignment (:func:`_keyed_entry`). A key seen before was validated then, so a repeated call checks
nothing else, computes no launch parameter and allocates at most its output (none with ``out=``):
the entry's ``run`` (the plan's launch through its compiled handles,
:attr:`tpa.ops.decode_launch.DecodePlan.fast_run`, or the reference twin) takes the call from there.
A new key runs the full validation (:func:`_validate`) with its error messages and builds the plan.

Run-time cache lengths: ``cache_seqlens`` is read by the kernel from device memory, and each
split's slice of the cache is computed in the kernel from the sequence's own length, so a new
length neither recompiles nor re-tunes nor syncs with the host. The number of splits is chosen on
the host from shapes only (batch, heads, queries, cache capacity, SM count), so one call can be
captured in a CUDA graph and replayed at any length up to the capacity. The capacity itself (and
the strides derived from it) is a shape: changing the cache buffer size may compile a new variant.

Inputs on the CPU with ``backend="triton"`` run the same kernels through Triton's interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported (Triton decides at
import time whether its own library functions are interpreted): that is how the tests exercise the
kernels without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tpa.ops import decode_launch
from tpa.ops.naive import tpa_decode_reference
from tpa.ops.triton_support import (HAVE_TRITON, least_padding_block, next_pow2, require_runnable,
                                    triton_interpreter_active)

__all__ = [
    "DEFAULT_LAUNCH_OPTIONS",
    "DecodeConfig",
    "DecodeHeuristic",
    "DecodeLaunchOptions",
    "check_cache_seqlens",
    "default_config",
    "tpa_decode",
    "tpa_decode_triton",
    "triton_interpreter_active",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_is_compiling = torch.compiler.is_compiling
_PLANS = decode_launch.PLANS  # never rebound (decode_launch.clear_plans empties it)
_PLANS_GET = _PLANS.get  # bound once: it runs on every call
_RECENT = decode_launch.RECENT  # [the entry of the last keyed call with aligned pointers], never rebound
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without dynamo's C guards: every call goes through the key
    _TensorGuards = None
_MAX_FEATURE_DIM = 256  # D and E the kernel is built and tested for
_MAX_SPLITS = 1024  # what DecodeConfig accepts (the merge kernel's BLOCK_S); the heuristic's cap is DecodeHeuristic.max_splits


# --------------------------------------------------------------------------------------------
# Launch parameters: from shapes only (never from cache_seqlens values).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. ``None`` fields are filled by :func:`default_config`.

    Attributes:
        block_m: cache tokens per loop iteration (power of two, >= 16).
        block_h: heads per program (power of two; heads beyond H are masked; the tile's
            ``block_h x block_n`` rows must be at least 16). Below H, a program grid of
            ``ceil(H / block_h)`` head blocks per query block (H need not be a multiple of it).
        block_n: queries per program (power of two).
        num_splits: KV splits per (sequence, head/query tile); 1 writes the output directly and
            skips the merge kernel.
        num_warps, num_stages: Triton launch options of the split kernel.
        max_registers: registers per thread the split kernel may use (Triton's ``maxnreg``; more
            programs fit on an SM, at the risk of spills); None: the compiler's choice.
    """

    block_m: int | None = None
    block_h: int | None = None
    block_n: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    max_registers: int | None = None

    def __post_init__(self) -> None:
        """Reject values the kernel cannot be built with, naming the field and what it accepts."""
        for name in ("block_m", "block_h", "block_n", "num_splits", "num_warps", "num_stages", "max_registers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DecodeConfig: {name} must be a positive int or None, got {value!r}")
        for name in ("block_m", "block_h", "block_n", "num_warps"):
            value = getattr(self, name)
            if value is not None and value & (value - 1):
                raise ValueError(f"DecodeConfig: {name} must be a power of two, got {value}")
        if self.block_m is not None and self.block_m < 16:
            raise ValueError(f"DecodeConfig: block_m must be >= 16 (tl.dot's smallest tile), got {self.block_m}")
        if self.num_warps is not None and self.num_warps > 32:
            raise ValueError(f"DecodeConfig: num_warps must be at most 32, got {self.num_warps}")
        if self.num_splits is not None and self.num_splits > _MAX_SPLITS:
            raise ValueError(f"DecodeConfig: num_splits must be at most {_MAX_SPLITS}, got {self.num_splits}")


@dataclass(frozen=True)
class DecodeHeuristic:
    """Constants of the launch heuristic (:func:`default_config`), set from measurements
    (BENCHMARKS.md, FlashTPA decode; ``tpa bench decode --tune`` measures candidates).

    Attributes:
        warps: ``"rows"`` gives each group of 16 rows of a tile its own warp (2 to 8 warps) for head
            dims up to 128 and small rank x block tiles (more registers per thread otherwise
            spill); ``"fixed"`` uses 4 warps (8 for large tiles).
        block_m: cache tokens per block for 16-bit caches (float32 uses half).
        num_stages: software pipeline depth (reduced until the staged tiles fit shared memory).
        splits: how the split count is chosen. ``"waves"`` (default): the count whose grid fills
            whole waves of the programs an SM holds at once best (:func:`resident_programs`), one
            wave unless two fill the SMs at least ``wave_fill_margin`` better (H200, 2026-12-02:
            one wave of two 4-warp programs per SM ran up to 23% faster than the two waves of
            ``programs_per_sm=4``, at 90 points of B 1-16, 32K-512K tokens, H 32 and 34; BENCHMARKS.md,
            "whole waves"). ``"programs"``: about ``programs_per_sm`` programs per SM.
        programs_per_sm: the split count's target with ``splits="programs"``.
        wave_fill_margin: with ``splits="waves"``, how much better (as a fraction of the SMs'
            program slots) two waves must fill them to be chosen over one.
        max_splits: the most splits the heuristic picks for splits of fewer than
            ``long_split_blocks`` blocks each; splits of at least that many blocks may number up to
            1024 (``DecodeConfig.num_splits``'s limit). At batch 1 a wave of 2-warp programs takes 528
            splits on 132 SMs (H200, 2026-12-02, B=1, H=32, ranks (16,1,1): 512 splits of 16 blocks
            66.8 µs against 77.0 for 256 at 512K tokens; 512 splits of 4 blocks 31.4 against 30.3 µs
            at 128K).
        long_split_blocks: see ``max_splits``.
        min_split_blocks: each split covers at least this many blocks of capacity.
        rank_four_half_blocks: caches of rank 4 (``R_k + R_v``) in tiles of 17-32 rows, two or more tiles
            and 32K tokens of capacity or more, take half the block (:func:`default_config`).
        merge_program_bytes: the most bytes of partial outputs one program of the merge kernel reads;
            a row of more is merged by several programs, each a slab of its columns
            (:func:`tpa.ops.decode_launch.merge_slab`).
        head_blocks: ``"pow2"`` (default) gives a program all heads, ``next_pow2(H)`` rows, while the
            tile stays small; ``"least_padding"`` picks the head block of 16 rows or more (up to that)
            with the fewest masked rows, the largest among equals: at H = 34, three blocks of 16
            (48 rows, the head-shared factors read by each) instead of one of 64.
    """

    warps: str = "rows"
    block_m: int = 64
    num_stages: int = 3
    programs_per_sm: int = 4
    min_split_blocks: int = 2
    head_blocks: str = "pow2"
    splits: str = "waves"
    wave_fill_margin: float = 0.02
    max_splits: int = 256
    long_split_blocks: int = 16
    merge_program_bytes: int = 32768
    rank_four_half_blocks: bool = True

    def __post_init__(self) -> None:
        if self.splits not in ("waves", "programs"):
            raise ValueError(f"DecodeHeuristic: splits must be 'waves' or 'programs', got {self.splits!r}")
        if isinstance(self.max_splits, bool) or not isinstance(self.max_splits, int) or not 1 <= self.max_splits <= _MAX_SPLITS:
            raise ValueError(f"DecodeHeuristic: max_splits must be an int in [1, {_MAX_SPLITS}], got {self.max_splits!r}")
        if isinstance(self.merge_program_bytes, bool) or not isinstance(self.merge_program_bytes, int) or \
                self.merge_program_bytes < 1:
            raise ValueError(f"DecodeHeuristic: merge_program_bytes must be a positive int, got {self.merge_program_bytes!r}")
        if isinstance(self.long_split_blocks, bool) or not isinstance(self.long_split_blocks, int) or self.long_split_blocks < 1:
            raise ValueError(f"DecodeHeuristic: long_split_blocks must be a positive int, got {self.long_split_blocks!r}")
        if self.head_blocks not in ("pow2", "least_padding"):
            raise ValueError(
                f"DecodeHeuristic: head_blocks must be 'pow2' or 'least_padding', got {self.head_blocks!r}"
            )


@dataclass(frozen=True)
class DecodeLaunchOptions:
    """How the decode kernels are configured and launched (one object per caller, no global switch).

    Attributes:
        heuristic: constants of :func:`default_config`.
        use_pdl: programmatic dependent launch of the merge kernel (Hopper and later): it starts
            while the split kernel finishes and waits on the device for its results.
        early_launch: with PDL and a split grid that fits on the SMs at once, the split kernel
            triggers the merge kernel's launch as it starts, instead of as its programs finish.
        poison_buffers: test hook; fill every buffer the op allocates (output, lse, split partials)
            with NaN before the kernels run, so an element a kernel fails to write shows up as NaN.
        a_head_pad: for caches whose head-factor rows are padded (a T6 model's with
            ``tpa_cache_head_multiple=M``; ``tpa bench decode --pad-a-heads``): with M > 1 the loads
            of ``a_k_cache`` and ``a_v_cache`` read ``ceil(H / M) * M`` heads per row (the extra
            heads are discarded), so that their mask does not split vectors; every call's A caches
            must then be views ``buf[..., :H]`` of buffers with at least that many heads and unit
            head stride (checked when a call's plan is built, from strides and storage size).
            1 (default): the loads read H heads.
        heads_inner: launch order of the split kernel's grid: the head/query tiles of one split side by
            side (grid ``(tiles, splits, B)``), so that tiles reading the same tokens' head-shared
            factors run together and can share them through L2; False (default): ``(splits, tiles, B)``.
            It matters only with several head blocks (``DecodeConfig.block_h`` below H).
        timeline: profiling hook (CUDA only); the split kernel stores each program's clock at its
            start, after its queries, after its loop and at its end, and its SM, in the plan's
            ``times`` (int64 ``[programs, 5]``, nanoseconds; ``benchmarks/dev/decode_gap.py --timeline``).
        a_dot: for 16-bit caches, the split kernel brings each block's head factors ``a_k`` and ``a_v``
            (``[heads, tokens]`` tiles) to the tile's rows through a one-hot ``tl.dot`` (exact: one
            product by 1, the others by 0), so that Triton's pipeline stages them in shared memory
            with ``cp.async`` as it does the dot operands ``b_k`` and ``b_v``, instead of in registers
            (H200, 2026-12-04: 2-9% less time at every point of 201-805 MB, BENCHMARKS.md). The loads
            then read H heads per row (``a_head_pad`` does not apply), and a non-finite value among
            the valid tokens of one head's factors turns every head of its tile to NaN, not only its own.
            False: plain loads into registers (float32 caches always).
    """

    heuristic: DecodeHeuristic = field(default_factory=DecodeHeuristic)
    use_pdl: bool = True
    early_launch: bool = True
    poison_buffers: bool = False
    a_head_pad: int = 1
    heads_inner: bool = False
    timeline: bool = False
    a_dot: bool = True

    def __post_init__(self) -> None:
        pad = self.a_head_pad
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
            raise ValueError(f"DecodeLaunchOptions: a_head_pad must be an int >= 1, got {pad!r}")


DEFAULT_LAUNCH_OPTIONS = DecodeLaunchOptions()


# programs of a latency-bound grid (at most two cache blocks each, 4 warps) one SM runs at once
_LATENCY_BOUND_PROGRAMS_PER_SM = 2


def _whole_block_splits(blocks: int, splits: int) -> int:
    """As many splits as it takes to cover ``blocks`` in equal whole blocks (no empty split)."""
    return math.ceil(blocks / math.ceil(blocks / splits))


_REGISTERS_PER_SM = 65536  # every NVIDIA GPU since Kepler
_KERNEL_REGISTERS = 256  # per thread: the split kernel uses 176-255 (sm_90, H200, 2026-12-02), allocated per warp in units of 256


def resident_programs(num_warps: int) -> int:
    """Programs of the split kernel one SM holds at once: what its register file allows for programs
    of ``num_warps`` warps at up to 256 registers per thread (4 warps: 2, 2 warps: 4). Shared memory
    is not the limit on Hopper for the tiles :func:`default_config` picks (40-74 KB per program, of
    228 KB), nor warps (at most 64 per SM)."""
    return max(1, _REGISTERS_PER_SM // (num_warps * 32 * _KERNEL_REGISTERS))


def _wave_splits(base: int, blocks: int, slots: int, most: int, margin: float) -> int:
    """The split count (whole blocks each, at most ``most``) whose ``base * splits`` programs
    fill whole waves of ``slots`` (programs resident on all SMs at once) best: one wave, or two when
    their fill (programs over the slots of the waves they take) is more than ``margin`` higher."""
    best_fill, best = -1.0, 1
    for waves in (1, 2):
        splits = _whole_block_splits(blocks, max(1, min(waves * slots // max(base, 1), most)))
        programs = base * splits
        fill = programs / (math.ceil(programs / slots) * slots)
        if fill > best_fill + (margin if waves > 1 else 0.0):
            best_fill, best = fill, splits
    return best


def default_config(
    batch: int,
    num_queries: int,
    num_heads: int,
    d: int,
    e: int,
    capacity: int,
    num_sms: int,
    element_size: int = 2,
    override: DecodeConfig | None = None,
    k_rank: int = 1,
    v_rank: int = 1,
    heuristic: DecodeHeuristic | None = None,
) -> DecodeConfig:
    """Pick launch parameters from shapes alone (the cache capacity, never the current lengths).

    Heads and queries of one program share every cache byte it loads, so a program takes all heads
    when its tiles stay small (rows x max(D, E) <= 8K elements; more head blocks otherwise). The
    pipeline depth and then the cache block shrink until the staged tiles fit in shared memory, to
    3 stages of 32 tokens before 2 stages (and blocks down to 16). The number
    of splits fills whole waves of the programs the SMs hold at once (``heuristic.splits``, default
    :class:`DecodeHeuristic`), with at least ``min_split_blocks`` blocks of capacity per split, at
    most ``max_splits`` (256) splits unless each keeps ``long_split_blocks`` (16) blocks, and no
    empty split when the cache is full. Programs that stream at most two blocks are bound by memory latency, not
    bandwidth, and get 4 warps, as do the 16-row tiles of one sequence in one wave.
    """
    o = override or DecodeConfig()
    block_d, block_e = max(16, next_pow2(d)), max(16, next_pow2(e))
    max_rows = max(16, 8192 // max(block_d, block_e))
    tune = heuristic or DecodeHeuristic()
    if o.block_h is not None:
        block_h = o.block_h
    elif tune.head_blocks == "least_padding":
        block_h = least_padding_block(num_heads, 16, max(16, min(next_pow2(num_heads), max_rows)))
    else:
        block_h = min(next_pow2(num_heads), max_rows)
    if o.block_n is not None:
        block_n = o.block_n
    else:
        block_n = 1 if num_queries == 1 else min(next_pow2(num_queries), max(1, max_rows // block_h))
    if block_h * block_n < 16:  # tl.dot needs at least 16 rows
        if o.block_h is not None:
            raise ValueError(
                f"DecodeConfig: block_h={o.block_h} gives tiles of {o.block_h} heads x {block_n} queries = "
                f"{o.block_h * block_n} rows; tl.dot needs at least 16 (block_h >= {16 // block_n} here)"
            )
        block_h = max(block_h, 16 // block_n)
    rows = block_h * block_n
    base = batch * math.ceil(num_queries / block_n) * math.ceil(num_heads / block_h)
    block_m = o.block_m if o.block_m is not None else (tune.block_m if element_size <= 2 else tune.block_m // 2)
    if (o.block_m is None and tune.rank_four_half_blocks and k_rank + v_rank == 4 and 16 < rows <= 32 and base >= 2
            and capacity >= 32768 and block_m >= 64):
        # rank-4 caches (k + v) in tiles of 17-32 rows, two or more tiles: half the block, which the rows rule
        # runs with 2 warps, four programs an SM instead of two (H200, 2026-12-03, H = 32, ranks (6,2,2) and
        # (16,2,2), B 2-16 at 32K-512K tokens, back-to-back graph replay: faster at 22 of 24 points, by up
        # to 8.2% (B=2 128K 65.3 -> 61.7 us), 1.4% slower at worst (B=4 32K); at B=1 slower, 37.6 -> 42.9 us
        # at 128K; BENCHMARKS.md, "half blocks for rank-4 caches")
        block_m //= 2
    num_stages = o.num_stages if o.num_stages is not None else tune.num_stages

    def staged_bytes(bm: int, stages: int) -> int:  # upper estimate of the pipelined tiles
        return stages * bm * (k_rank * (block_d + rows) + v_rank * (block_e + rows)) * element_size

    budget = 160 * 1024
    # three stages of half the block before two of the whole one (H200, 2026-12-02, H = 34, ranks
    # (6,2,2), 32K tokens: B=8 87.3 -> 81.7 us, B=1 23.7 -> 23.0 us; BENCHMARKS.md, "the pipeline")
    for floor_stages, floor_block in ((3, 32), (2, 16)):
        if o.num_stages is None:
            while staged_bytes(block_m, num_stages) > budget and num_stages > floor_stages:
                num_stages -= 1
        if o.block_m is None:
            while staged_bytes(block_m, num_stages) > budget and block_m > floor_block:
                block_m //= 2
    blocks = math.ceil(capacity / block_m)
    rows_warps = tune.warps == "rows" and max(block_d, block_e) <= 128 and (k_rank + v_rank) * block_m <= 128

    def warps_for(latency_bound: bool) -> int:
        if o.num_warps is not None:
            return o.num_warps
        if rows_warps:
            return 4 if latency_bound and rows <= 64 else min(8, max(2, rows // 16))
        return 4 if rows * max(block_d, block_e) <= 4096 else 8

    if o.num_splits is not None:
        num_splits = o.num_splits
    else:
        longest = min(max(tune.max_splits, blocks // tune.long_split_blocks), _MAX_SPLITS)
        most = max(1, min(blocks // tune.min_split_blocks, longest))
        if tune.splits == "waves":
            slots = resident_programs(warps_for(False)) * num_sms
            num_splits = _wave_splits(base, blocks, slots, most, tune.wave_fill_margin)
        else:
            target = tune.programs_per_sm * num_sms
            num_splits = _whole_block_splits(blocks, max(1, min(math.ceil(target / max(base, 1)), most)))
        if blocks <= 2 * num_splits and base * num_splits > _LATENCY_BOUND_PROGRAMS_PER_SM * num_sms:
            # programs of at most two blocks get 4 warps (below), of which an SM holds two at a time
            # (registers): a grid of more waits for a second wave (H200, 2026-12-02, B=2 at 32K tokens:
            # 512 programs 25.2 us, 256 programs of four blocks 20.9 us)
            fit = math.ceil(_LATENCY_BOUND_PROGRAMS_PER_SM * num_sms / max(base, 1))
            num_splits = _whole_block_splits(blocks, max(1, min(fit, most)))
    # latency-bound: each program streams at most two blocks, or one sequence of 16-row tiles (H <= 16)
    # fills at most one wave of 4-warp programs (H200, 2026-12-03, H = 16, (16,1,1), B = 1, 256 splits
    # of 64-token blocks, 2 -> 4 warps: 19.9 -> 19.3 us at 64K tokens, 26.3 -> 24.9 at 128K, 39.0 -> 36.8
    # at 256K; at B = 2 slower, 34.3 -> 39.8 at 128K; BENCHMARKS.md, "16-row tiles")
    one_wave_sequence = rows <= 16 and base == 1 and num_splits <= resident_programs(4) * num_sms
    num_warps = warps_for(blocks <= 2 * num_splits or one_wave_sequence)
    return DecodeConfig(block_m, block_h, block_n, num_splits, num_warps, num_stages, o.max_registers)


# --------------------------------------------------------------------------------------------
# Validation and the public op
# --------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor, name: str, ndim: int) -> tuple[int, ...]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tpa_decode: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"tpa_decode: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return tuple(t.shape)


def check_cache_seqlens(
    cache_seqlens: torch.Tensor,
    capacity: int,
    num_queries: int,
    block_table: torch.Tensor | None = None,
    num_blocks: int | None = None,
) -> None:
    """Check the values of ``cache_seqlens`` (and of ``block_table``): ``N <= L_b <= capacity``.

    This reads device values, so on CUDA it synchronises with the host and must not run inside a
    CUDA graph capture; :func:`tpa_decode` calls it only where that costs nothing (CPU tensors) or
    when asked (``check_lengths=True``). Like FlashAttention, the kernel itself does not raise on a
    bad length; it clamps lengths to the capacity so that it never reads outside the cache.

    Raises:
        ValueError: a length below ``num_queries`` (a query would see no key) or above ``capacity``,
            or a block-table entry outside ``[0, num_blocks)`` for the blocks in use.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("check_cache_seqlens reads device values; it cannot run during CUDA graph capture")
    lens = cache_seqlens.detach().to("cpu", torch.long)
    if lens.numel() and int(lens.max()) > capacity:
        bad = int(lens.argmax())
        raise ValueError(
            f"tpa_decode: cache_seqlens[{bad}] = {int(lens[bad])} exceeds the cache capacity {capacity}"
        )
    if lens.numel() and int(lens.min()) < num_queries:
        bad = int(lens.argmin())
        raise ValueError(
            f"tpa_decode: cache_seqlens[{bad}] = {int(lens[bad])} is smaller than the number of query tokens "
            f"{num_queries}; cache_seqlens must count the new tokens, which are written to the cache before the call"
        )
    if block_table is not None and num_blocks is not None and lens.numel():
        page = capacity // block_table.shape[1]
        table = block_table.detach().to("cpu", torch.long)
        used = (torch.arange(table.shape[1])[None, :] * page) < lens[:, None]
        vals = table[used]
        if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= num_blocks):
            raise ValueError(
                f"tpa_decode: block_table holds block indices outside [0, {num_blocks}) for blocks in use"
            )


def _validate(a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens, block_table, out):
    """The full checks of :func:`tpa_decode`'s inputs, with their messages (run once per call key):
    the factors (:func:`_check_factors`), the lengths and block table (:func:`_check_layout`), ``out``.

    Returns ``(capacity, num_blocks)``; ``num_blocks`` is None without a block table."""
    bsz, n, h, e = _check_factors(a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens)
    capacity, num_blocks = _check_layout(cache_seqlens, block_table, a_k_cache.shape[:2], bsz, a_q.device)
    if n > capacity:
        raise ValueError(f"tpa_decode: N={n} query tokens do not fit in a cache of capacity {capacity}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"tpa_decode: out must be a torch.Tensor, got {type(out).__name__}")
        dtype, device = a_q.dtype, a_q.device
        if out.shape != (bsz, n, h, e) or out.dtype != dtype or out.device != device:
            raise ValueError(
                f"tpa_decode: out must be [B, N, H, E]={[bsz, n, h, e]} {dtype} on {device}, "
                f"got {list(out.shape)} {out.dtype} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("tpa_decode: out must be contiguous")
    return capacity, num_blocks


def _check_factors(a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens) -> tuple[int, int, int, int]:
    """The query factors and the four caches: tensors of 4 dimensions, one supported dtype, one device
    (``cache_seqlens``'s included), shapes that agree. Returns ``(B, N, H, E)``."""
    bsz, n, r_q, h = _shape(a_q, "a_q", 4)
    d = _shape(b_q, "b_q", 4)[-1]
    if b_q.shape[:3] != (bsz, n, r_q):
        raise ValueError(
            f"tpa_decode: b_q {tuple(b_q.shape)} must be [B, N, R_q, D] matching a_q {tuple(a_q.shape)} in B, N, R_q"
        )
    caches = {"a_k_cache": a_k_cache, "b_k_cache": b_k_cache, "a_v_cache": a_v_cache, "b_v_cache": b_v_cache}
    shapes = {name: _shape(t, name, 4) for name, t in caches.items()}
    dtype = a_q.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"tpa_decode: factors must be float16, bfloat16 or float32, got {dtype}")
    for name, t in (("b_q", b_q), *caches.items()):
        if t.dtype != dtype:
            raise TypeError(f"tpa_decode: all factors must share one dtype; a_q is {dtype}, {name} is {t.dtype}")
    device = a_q.device
    for name, t in (("b_q", b_q), *caches.items(), ("cache_seqlens", cache_seqlens)):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"tpa_decode: {name} is on {t.device}, a_q on {device}; all inputs must share a device")
    lead = shapes["a_k_cache"][:2]
    for name, shp in shapes.items():
        if shp[:2] != lead:
            raise ValueError(
                f"tpa_decode: the caches' first two dimensions must agree; a_k_cache has {lead}, {name} has {shp[:2]}"
            )
    r_k, r_v = shapes["a_k_cache"][2], shapes["a_v_cache"][2]
    if shapes["b_k_cache"][2] != r_k:
        raise ValueError(f"tpa_decode: a_k_cache and b_k_cache disagree on R_k ({r_k} vs {shapes['b_k_cache'][2]})")
    if shapes["b_v_cache"][2] != r_v:
        raise ValueError(f"tpa_decode: a_v_cache and b_v_cache disagree on R_v ({r_v} vs {shapes['b_v_cache'][2]})")
    if shapes["a_k_cache"][3] != h or shapes["a_v_cache"][3] != h:
        raise ValueError(
            f"tpa_decode: head count H={h} of a_q must match a_k_cache ({shapes['a_k_cache'][3]}) "
            f"and a_v_cache ({shapes['a_v_cache'][3]})"
        )
    if shapes["b_k_cache"][3] != d:
        raise ValueError(f"tpa_decode: b_k_cache feature dim {shapes['b_k_cache'][3]} must equal b_q's D={d}")
    e = shapes["b_v_cache"][3]
    if min(bsz, n, r_q, h, d, r_k, r_v, e) < 1 and bsz != 0:
        raise ValueError("tpa_decode: N, ranks, heads and feature dims must all be >= 1")
    return bsz, n, h, e


def _check_layout(cache_seqlens, block_table, lead, bsz, device) -> tuple[int, int | None]:
    """``cache_seqlens`` (``[B]`` int32, contiguous) and the block table or its absence, given the
    caches' first two dimensions ``lead``. Returns ``(capacity, num_blocks)`` (None without a table)."""
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"tpa_decode: cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"tpa_decode: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (bsz,):
        raise ValueError(f"tpa_decode: cache_seqlens must have shape [B]=[{bsz}], got {tuple(cache_seqlens.shape)}")
    if not cache_seqlens.is_contiguous():  # the kernel reads entry b at offset b
        raise ValueError(f"tpa_decode: cache_seqlens must be contiguous, got stride {cache_seqlens.stride()}")
    if block_table is None:
        if lead[0] != bsz:
            raise ValueError(f"tpa_decode: the caches' batch {lead[0]} must equal a_q's B={bsz} (or pass block_table)")
        return lead[1], None
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"tpa_decode: block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"tpa_decode: block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != bsz:
        raise ValueError(f"tpa_decode: block_table must be [B, max_blocks] with B={bsz}, got {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"tpa_decode: block_table is on {block_table.device}, a_q on {device}")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:  # the kernel reads row entries at unit stride
        raise ValueError(
            f"tpa_decode: block_table's rows must be contiguous (stride 1 along max_blocks), got strides "
            f"{block_table.stride()}"
        )
    return block_table.shape[1] * lead[1], lead[0]


class _Entry:
    """What repeated calls with one key reuse (see :func:`_make_entry`).

    ``run(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr)`` gives the call's
    result: :func:`_run_plan` until the plan has compiled handles, then the plan's
    :attr:`~tpa.ops.decode_launch.DecodePlan.fast_run`; :func:`_run_reference` for the twin."""

    __slots__ = ("call", "capacity", "check_by_default", "guard", "held", "num_blocks", "num_queries", "plan",
                 "return_lse", "run", "scale")

    def __init__(self, run, capacity, num_blocks, num_queries, check_by_default, plan, scale, return_lse, held):
        self.run = run
        self.capacity, self.num_blocks, self.num_queries = capacity, num_blocks, num_queries
        self.check_by_default = check_by_default  # cache_seqlens on the CPU: check_lengths=None checks its values
        self.plan = plan  # None for the reference twin and an empty batch
        self.scale, self.return_lse = scale, return_lse
        self.held = held  # config and options, kept alive while their ids are part of the key
        self.guard = None  # a TensorGuards of the tensors of the call that made it the recent entry
        self.call = None  # that call's other arguments (see tpa_decode)


def _use_triton(backend: str, device: torch.device, d: int, e: int) -> bool:
    if backend == "auto":
        return device.type == "cuda" and d <= _MAX_FEATURE_DIM and e <= _MAX_FEATURE_DIM and HAVE_TRITON
    if backend == "triton":
        require_runnable("tpa_decode", device.type)
        return True
    return False


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter: a small grid
    return decode_launch.num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _make_entry(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, out, softmax_scale, return_lse, backend,
                config, options):
    """Validate a call with a new key and build what its repeats reuse (an :class:`_Entry`)."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"tpa_decode: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    capacity, num_blocks = _validate(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, out)
    bsz, n, _, h = a_q.shape
    d, e = b_q.shape[-1], b_v.shape[-1]
    scale = float(d ** -0.5 if softmax_scale is None else softmax_scale)
    plan = None
    if _use_triton(backend, a_q.device, d, e) and bsz > 0:
        cfg = default_config(bsz, n, h, d, e, capacity, _num_sms(a_q.device), b_k.element_size(), config,
                             a_k.shape[2], a_v.shape[2], heuristic=options.heuristic)
        plan = decode_launch.DecodePlan(a_q, b_q, a_k, b_k, a_v, b_v, block_table, scale, return_lse, cfg, options)
    return _Entry(_run_plan if plan is not None else _run_reference, capacity, num_blocks, n,
                  not cache_seqlens.is_cuda, plan, scale, return_lse, (config, options))


def _run_plan(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr):
    """An entry's ``run`` while its plan has no compiled handles: through ``triton.jit``; once the
    handles exist, the entry runs the plan's ``fast_run`` from then on."""
    plan = entry.plan
    if plan.fast_run is not None:
        entry.run = plan.fast_run
        return plan.fast_run(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr)
    return plan.run(a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out)


def _run_reference(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr):
    """An entry's ``run`` for the reference twin (and every empty batch)."""
    return _decode_reference(a_q, b_q, a_k, b_k, a_v, b_v, lens, table, entry.scale, entry.return_lse, out)


def _new_entry(key, args):
    """Validate a call with a new key (``args``: :func:`_make_entry`'s), store its entry (the oldest
    one goes beyond ``MAX_PLANS``) and return it; ``key`` None stores nothing."""
    entry = _make_entry(*args)
    if key is not None:
        _PLANS[key] = entry
        if len(_PLANS) > decode_launch.MAX_PLANS:
            _PLANS.popitem(last=False)
    return entry


def tpa_decode_triton(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_k_cache: torch.Tensor,
    b_k_cache: torch.Tensor,
    a_v_cache: torch.Tensor,
    b_v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    return_lse: bool,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    options: DecodeLaunchOptions | None = None,
):
    """The Triton kernels on inputs :func:`tpa_decode` accepts, always (CPU tensors: interpreted).

    No host sync and no data-dependent Python: capturable in a CUDA graph once compiled.
    """
    return tpa_decode(a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens, block_table,
                      softmax_scale, return_lse, "triton", out, False, config, options)


def tpa_decode(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_k_cache: torch.Tensor,
    b_k_cache: torch.Tensor,
    a_v_cache: torch.Tensor,
    b_v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    check_lengths: bool | None = None,
    config: DecodeConfig | None = None,
    options: DecodeLaunchOptions | None = None,
):
    """FlashTPA decoding: attention of N new query tokens over a cache of TPA factors.

    Computes, per sequence b, query i and head h (Algorithm 2 of the paper, exact softmax):
    ``q = (1/R_q) A_q^T B_q``, ``k_j = (1/R_k) A_k^T B_k``, ``v_j = (1/R_v) A_v^T B_v``,
    ``out = softmax(scale * q . k_j over j < L_b - N + 1 + i) @ v``, without materialising K or V.

    Args:
        a_q: ``[B, N, R_q, H]`` query head factors; ``b_q``: ``[B, N, R_q, D]`` query feature factors
            (RoPE applied). N >= 1: plain decoding (N=1), chunked prefill or speculative decoding.
        a_k_cache: ``[B, M, R_k, H]``; b_k_cache: ``[B, M, R_k, D]`` (RoPE applied);
            a_v_cache: ``[B, M, R_v, H]``; b_v_cache: ``[B, M, R_v, E]``. M is the capacity.
            With ``block_table``, each is paged: ``[num_blocks, block_size, R, X]``.
            Any strides are accepted (a model's preallocated ``[B, M_capacity, R, X]`` buffers are
            used in place, without a copy).
        cache_seqlens: ``[B]`` int32 (contiguous), valid cached tokens per sequence, the N new tokens included
            (they are written to the cache before the call). Query i of sequence b sees cache
            entries ``j < cache_seqlens[b] - N + 1 + i``. Requires ``N <= cache_seqlens[b] <= M``.
        block_table: optional ``[B, max_blocks]`` int32 with contiguous rows, physical block of each
            logical block; the capacity is then ``max_blocks * block_size``.
        softmax_scale: scale of the logits, default ``D ** -0.5``. The rank normalisations
            1/R_q, 1/R_k, 1/R_v (eq. 3.1) are applied inside the op: pass raw factors.
        return_lse: also return the natural-log log-sum-exp of the scaled logits, ``[B, N, H]`` float32.
        backend: ``"auto"``: the Triton kernel for CUDA tensors (when Triton is installed and
            D, E <= 256), otherwise the reference twin :func:`tpa.ops.naive.tpa_decode_reference`
            (CPU tensors, no Triton, or larger head dims). ``"triton"``: always the kernel; on CPU
            tensors it runs under Triton's interpreter (slow; for tests). ``"reference"``: the twin.
        out: optional ``[B, N, H, E]`` contiguous output buffer in the dtype of ``a_q``, written in place.
        check_lengths: check ``N <= cache_seqlens <= capacity`` (and block-table entries) with
            :func:`check_cache_seqlens`. ``None`` (default) checks only when ``cache_seqlens`` is on
            the CPU, where it costs no device sync; on CUDA the check is skipped (the call stays
            free of host syncs and capturable in a CUDA graph), and an out-of-range length is
            clamped to the capacity by the kernel. ``True`` always checks (syncs on CUDA).
        config: optional :class:`DecodeConfig` overriding launch parameters (tests, benchmarks).
        options: optional :class:`DecodeLaunchOptions` (heuristic constants, PDL, test hooks);
            default :data:`DEFAULT_LAUNCH_OPTIONS`.

    Returns:
        ``out [B, N, H, E]`` in the dtype of ``a_q``; with ``return_lse``, ``(out, lse [B, N, H])``.

    Host cost: a repeat of the last call is found by a guard of its tensors, another call by its key
    (classes, shapes, strides, dtypes, devices, alignment, arguments); either way a known call skips
    validation and launch planning (module docstring). Under ``torch.compile`` the Triton path is the
    ``triton_op`` ``torch.ops.tpa.decode``, whose launches inductor emits. The repeat's path is this
    function's body and the entry's ``run``, with no other Python call of this module.

    Raises:
        TypeError: a non-tensor argument, unsupported or mismatched dtypes, ``cache_seqlens`` or
            ``block_table`` not int32.
        ValueError: mismatched shapes or devices, a non-contiguous ``cache_seqlens``, ``out`` or
            block-table row, a length outside ``[N, capacity]`` where checked, an unknown backend.
    """
    options = DEFAULT_LAUNCH_OPTIONS if options is None else options
    if _is_compiling():
        return _decode_traced(a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens, block_table,
                              softmax_scale, return_lse, backend, out, check_lengths, config, options)
    a_k, b_k, a_v, b_v, lens, table = a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens, block_table
    try:  # the pointers the launch passes on; a non-tensor argument goes to the full validation
        p0, p1, p2, p3 = a_q.data_ptr(), b_q.data_ptr(), a_k.data_ptr(), b_k.data_ptr()
        p4, p5, p6 = a_v.data_ptr(), b_v.data_ptr(), lens.data_ptr()
        p7 = p6 if table is None else table.data_ptr()  # lens's without a table (the kernel does not read it)
        out_ptr = None if out is None else out.data_ptr()
    except AttributeError:
        entry = _new_entry(None, (a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, softmax_scale, return_lse, backend,
                                  config, options))
        return entry.run(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, None, None)
    ptrs = (p0, p1, p2, p3, p4, p5, p6, p7)
    tensors = (a_q, b_q, a_k, b_k, a_v, b_v, lens) if table is None else (a_q, b_q, a_k, b_k, a_v, b_v, lens, table)
    if out is not None:
        tensors += (out,)
    call = (softmax_scale, return_lse, backend, config, options, table is None, out is None)
    misaligned = (p0 | p1 | p2 | p3 | p4 | p5 | p6 | p7 | (out_ptr or 0)) & 15
    entry = _RECENT[0]
    if misaligned or entry is None or entry.call != call or not entry.guard.check(*tensors):
        entry = _keyed_entry(tensors, ptrs, out_ptr, misaligned, call)
    if check_lengths or (check_lengths is None and entry.check_by_default):
        check_cache_seqlens(cache_seqlens, entry.capacity, entry.num_queries, block_table, entry.num_blocks)
    return entry.run(entry, a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, ptrs, out_ptr)


def _keyed_entry(tensors, ptrs, out_ptr, misaligned, call) -> _Entry:
    """The entry of a call that is not the last one's repeat (see :func:`tpa_decode`): looked up by
    its key, or validated and planned (:func:`_new_entry`). With aligned pointers it becomes the
    recent entry, with a guard of this call's tensors.

    The key holds what validation and launch depend on but values: each tensor's class, shape,
    strides (True for a contiguous one: along dimensions of size > 1 they follow from its shape, and
    a dimension of size 1 is only indexed at 0), dtype and device; the other arguments, config and
    options by identity (their entry holds them, so an id is not reused); the pointers' alignment."""
    softmax_scale, return_lse, backend, config, options, no_table, no_out = call
    a_q, b_q, a_k, b_k, a_v, b_v, lens = tensors[:7]
    table = None if no_table else tensors[7]
    out = None if no_out else tensors[-1]
    key = (softmax_scale, return_lse, backend, id(config), id(options), no_table, no_out,
           *((t.__class__, t.shape, t.is_contiguous() or t.stride(), t.dtype, t.device) for t in tensors))
    if misaligned:  # which pointers are misaligned: the kernel's specialisation
        key += (*(p & 15 for p in ptrs), (out_ptr or 0) & 15)
    entry = _PLANS_GET(key)
    if entry is None:
        entry = _new_entry(key, (a_q, b_q, a_k, b_k, a_v, b_v, lens, table, out, softmax_scale, return_lse, backend,
                                 config, options))
    if not misaligned:
        if entry.guard is None or not entry.guard.check(*tensors):  # (a guard also holds the dispatch keys' mode)
            entry.guard = _tensor_guard(tensors)
        entry.call = call
        _RECENT[0] = entry if entry.guard is not None else None
    return entry


def _tensor_guard(tensors):
    """A check that tensors have these tensors' classes, dtypes, devices, shapes, strides and
    dispatch keys (PyTorch's C++ ``TensorGuards``, ~0.1 us per tensor), or None without one."""
    if _TensorGuards is None:
        return None
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                             dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except (TypeError, RuntimeError):  # another signature in this torch: no recent-call shortcut
        return None


def _decode_reference(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, scale, return_lse, out):
    """The reference twin (also every empty batch), written into ``out`` when given."""
    bsz, n, _, h = a_q.shape
    if bsz == 0:
        e = b_v.shape[-1]
        result = out if out is not None else torch.empty((0, n, h, e), dtype=a_q.dtype, device=a_q.device)
        return (result, torch.empty((0, n, h), dtype=torch.float32, device=a_q.device)) if return_lse else result
    res = tpa_decode_reference(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table=block_table,
                               softmax_scale=scale, return_lse=return_lse)
    o, lse = res if return_lse else (res, None)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_lse else o


def _decode_traced(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, softmax_scale, return_lse, backend,
                   out, check_lengths, config, options):
    """:func:`tpa_decode` under ``torch.compile``: the same checks (lengths only when asked), then the
    ``triton_op`` (inductor emits its launches; the launch parameters are chosen inside it) or the
    reference twin."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"tpa_decode: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    capacity, num_blocks = _validate(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, out)
    if check_lengths:
        check_cache_seqlens(cache_seqlens, capacity, a_q.shape[1], block_table, num_blocks)
    d, e = b_q.shape[-1], b_v.shape[-1]
    scale = float(d ** -0.5 if softmax_scale is None else softmax_scale)
    if not (_use_triton(backend, a_q.device, d, e) and a_q.shape[0] > 0):
        return _decode_reference(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, scale, return_lse, out)
    dense = all(t.is_contiguous() for t in (a_q, b_q, a_k, b_k, a_v, b_v))
    op = decode_launch.DECODE_OP if dense else decode_launch.DECODE_STRIDED_OP  # see _register_strided_op
    o, lse = op(a_q, b_q, a_k, b_k, a_v, b_v, cache_seqlens, block_table, scale, return_lse,
                decode_launch.config_to_list(config or DecodeConfig(), options))
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_lse else o
