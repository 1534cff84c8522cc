"""FlashTPA decoding (the paper's Section 5, Algorithm 2 and Appendix B.1) as a Triton kernel.

The stack, bottom to top:

- ``_tpa_decode_split_kernel``: one program per (KV split, head/query tile, sequence). It forms the
  program's queries from their factors once (``Q = A_q^T B_q``, H x D per query, float32), then
  streams its slice of the factor cache in blocks of ``BLOCK_M`` tokens, never materialising K or V:
  per key rank, head-shared feature dots ``Q B_k^T`` (one matrix product for all heads) times the
  per-head factor ``a_k``; an online softmax in float32 (base 2); per value rank, the head-weighted
  probabilities ``p * a_v`` times ``B_v`` (a second matrix product). Accumulation, running max and
  running sum are float32. With one split it writes the final output; otherwise it writes a
  float32 partial output and log-sum-exp per split.
- ``_tpa_decode_merge_kernel``: merges the splits with a float32 log-sum-exp (flash-decoding).
- ``tpa_decode_triton``: the host wrapper (launch parameters, buffers, grid).
- ``tpa_decode``: the public op: validates, fills defaults, dispatches to Triton or to the reference
  twin :func:`tpa.ops.naive.tpa_decode_reference`.

Run-time cache lengths: ``cache_seqlens`` is read by the kernel from device memory, and each
split's slice of the cache is computed in the kernel from the sequence's own length, so a new
length neither recompiles nor re-tunes nor syncs with the host. The number of splits is chosen on
the host from shapes only (batch, heads, queries, cache capacity, SM count), so one call can be
captured in a CUDA graph and replayed at any length up to the capacity. The capacity itself (and
the strides derived from it) is a shape: changing the cache buffer size may compile a new variant.

The kernels are wrapped with ``triton.jit`` on the first call of the Triton path (``_kernels``); note
that ``import tpa.ops`` may import triton anyway (through ``torch._dynamo``, which the custom ops pull in;
``import tpa`` alone imports neither torch nor triton).
Inputs on the CPU with ``backend="triton"`` run the same kernels through Triton's interpreter, which
needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported (Triton decides at
import time whether its own library functions are interpreted): that is how the tests exercise the
kernels without a GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tpa.ops.naive import tpa_decode_reference

__all__ = [
    "DecodeConfig",
    "check_cache_seqlens",
    "default_config",
    "tpa_decode",
    "tpa_decode_triton",
    "triton_interpreter_active",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_FEATURE_DIM = 256  # D and E the kernel is built and tested for
_MAX_SPLITS = 256

# Constants of the launch heuristic (default_config). ``warps``: "rows" gives each group of 16 rows
# of a tile its own warp (2 to 8 warps) for head dims up to 128 and small rank x block tiles (more
# registers per thread otherwise spill), "fixed" uses 4 warps (8 for large tiles). ``block_m`` is
# for 16-bit caches (float32 uses half). ``programs_per_sm``: the split count aims at this many
# programs per SM; ``min_split_blocks``: each split covers at least this many blocks of capacity.
# Set from measurements (BENCHMARKS.md, FlashTPA decode).
_HEURISTIC = {"warps": "rows", "block_m": 64, "num_stages": 3, "programs_per_sm": 4, "min_split_blocks": 2}
_LOG2E = 1.4426950408889634

# Test hook: when True, the wrapper fills every buffer it allocates (output, lse, split partials)
# with NaN before the kernels run, so an element a kernel fails to write shows up as NaN.
_POISON_BUFFERS = False


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions here; ``_kernels()`` wraps them with ``triton.jit`` (or Triton's
# interpreter) on first use, after putting ``tl`` in this module's globals. Annotations are strings
# (``from __future__ import annotations``), which is what Triton reads for ``tl.constexpr``.
# --------------------------------------------------------------------------------------------

tl = None  # triton.language, bound by _kernels()
_round_bf16_jit = None  # triton.jit(_round_bf16), bound by _kernels()


def _round_bf16(x, FIX: tl.constexpr):
    """Round float32 ``x`` to the nearest bfloat16 value (ties to even), kept in float32, when FIX.

    Only for Triton's interpreter, whose float32 -> bfloat16 cast truncates; compiled code rounds to
    nearest even in the cast itself (FIX is False there), so both give the same numbers."""
    if FIX:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


def _tpa_decode_split_kernel(
    AQ, BQ, AK, BK, AV, BV, SEQLENS, BLOCK_TABLE,
    OUT, LSE, O_PART, LSE_PART,
    N, capacity, num_splits, scale_log2, out_scale,
    s_aq_b, s_aq_n, s_aq_r, s_aq_h,
    s_bq_b, s_bq_n, s_bq_r, s_bq_d,
    s_ak_b, s_ak_m, s_ak_r, s_ak_h,
    s_bk_b, s_bk_m, s_bk_r, s_bk_d,
    s_av_b, s_av_m, s_av_r, s_av_h,
    s_bv_b, s_bv_m, s_bv_r, s_bv_e,
    s_bt_b,
    H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
    R_Q: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    SPLIT: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    WRITE_LSE: tl.constexpr, IEEE_DOT: tl.constexpr, FIX_BF16: tl.constexpr, OFFS_64: tl.constexpr,
    EARLY_LAUNCH: tl.constexpr,
):
    """One (split, head/query tile, sequence). Rows of every tile are (query, head) pairs:
    row = n_local * BLOCK_H + h_local. For a contiguous cache the ``*_b`` strides step over
    sequences and ``*_m`` over tokens; for a paged cache ``*_b`` steps over physical blocks and
    ``*_m`` over tokens within a block."""
    if EARLY_LAUNCH:  # let the merge kernel (launched with PDL) start now; it waits for our results
        tl.extra.cuda.gdc_launch_dependents()
    pid_s = tl.program_id(0)
    pid_hq = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    ROWS: tl.constexpr = BLOCK_N * BLOCK_H
    hb = pid_hq % NUM_H_BLOCKS
    qb = pid_hq // NUM_H_BLOCKS

    rows = tl.arange(0, ROWS)
    r_h = hb * BLOCK_H + rows % BLOCK_H
    r_n = qb * BLOCK_N + rows // BLOCK_H
    h_ok = r_h < H
    row_ok = h_ok & (r_n < N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    d_ok = offs_d < D
    e_ok = offs_e < E
    offs_m = tl.arange(0, BLOCK_M)

    # Length of this sequence, clamped to the capacity so that a bad length never reads out of bounds.
    seqlen = tl.minimum(tl.load(SEQLENS + b), capacity)
    # Causal mask aligned to the end: query n sees tokens j < seqlen - N + 1 + n.
    limit = seqlen - N + 1 + r_n
    # This split's slice of [0, seqlen), in whole blocks, from the run-time length.
    n_blocks = (seqlen + BLOCK_M - 1) // BLOCK_M
    blocks_per_split = (n_blocks + num_splits - 1) // num_splits
    lo = pid_s * blocks_per_split * BLOCK_M
    hi = tl.minimum(lo + blocks_per_split * BLOCK_M, seqlen)

    # Queries of this tile from their factors as one small matrix product, exact products and
    # float32 sums: q[row, d] = sum_r a_q[n, r, h] b_q[n, r, d] with (n, h) the row's query and head.
    # Column c of the left operand is (query c // R_PAD, rank c % R_PAD); it is zero unless that
    # query is the row's own, so the product is block diagonal over the tile's queries.
    KQ: tl.constexpr = BLOCK_N * R_PAD
    cols = tl.arange(0, KQ)
    c_n = cols // R_PAD
    c_r = cols % R_PAD
    c_ok = c_r < R_Q
    a_q = tl.load(
        AQ + b64 * s_aq_b + r_n[:, None] * s_aq_n + c_r[None, :] * s_aq_r + r_h[:, None] * s_aq_h,
        mask=row_ok[:, None] & c_ok[None, :] & (c_n[None, :] == (rows // BLOCK_H)[:, None]),
        other=0.0,
    )  # [ROWS, KQ]
    q_n = qb * BLOCK_N + c_n
    b_q = tl.load(
        BQ + b64 * s_bq_b + q_n[:, None] * s_bq_n + c_r[:, None] * s_bq_r + offs_d[None, :] * s_bq_d,
        mask=(c_ok & (q_n < N))[:, None] & d_ok[None, :],
        other=0.0,
    )  # [KQ, BLOCK_D]
    if IEEE_DOT:
        q = tl.dot(a_q.to(tl.float32), b_q.to(tl.float32), input_precision="ieee")
    else:
        q = tl.dot(a_q, b_q)
    kv_dtype = BK.dtype.element_ty
    q = _round_bf16_jit(q, FIX_BF16).to(kv_dtype)

    acc = tl.zeros([ROWS, BLOCK_E], dtype=tl.float32)
    m_i = tl.full([ROWS, 1], -3.0e38, dtype=tl.float32)
    l_i = tl.zeros([ROWS, 1], dtype=tl.float32)

    if not PAGED:
        ak_base = AK + b64 * s_ak_b
        bk_base = BK + b64 * s_bk_b
        av_base = AV + b64 * s_av_b
        bv_base = BV + b64 * s_bv_b

    for start in range(lo, hi, BLOCK_M):
        tok = start + offs_m
        tok_ok = tok < hi
        if PAGED:
            blk = tl.load(BLOCK_TABLE + b64 * s_bt_b + tok // PAGE_SIZE, mask=tok_ok, other=0).to(tl.int64)
            in_blk = tok % PAGE_SIZE
            ak_tok = AK + blk * s_ak_b + in_blk * s_ak_m
            bk_tok = BK + blk * s_bk_b + in_blk * s_bk_m
            av_tok = AV + blk * s_av_b + in_blk * s_av_m
            bv_tok = BV + blk * s_bv_b + in_blk * s_bv_m
        else:
            if OFFS_64:  # token offsets beyond 2^31 elements in a huge cache
                tok_o = tok.to(tl.int64)
            else:
                tok_o = tok
            ak_tok = ak_base + tok_o * s_ak_m
            bk_tok = bk_base + tok_o * s_bk_m
            av_tok = av_base + tok_o * s_av_m
            bv_tok = bv_base + tok_o * s_bv_m

        # (1)+(2) logits: per key rank, head-shared feature dots, then the per-head factor a_k.
        s = tl.zeros([ROWS, BLOCK_M], dtype=tl.float32)
        for rk in tl.static_range(R_K):
            k_t = tl.load(bk_tok[None, :] + rk * s_bk_r + offs_d[:, None] * s_bk_d,
                          mask=d_ok[:, None] & tok_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_M]
            if IEEE_DOT:
                qk = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision="ieee")
            else:
                qk = tl.dot(q, k_t)
            a_k = tl.load(ak_tok[None, :] + rk * s_ak_r + r_h[:, None] * s_ak_h,
                          mask=h_ok[:, None] & tok_ok[None, :], other=0.0)  # [ROWS, BLOCK_M]
            s += qk * a_k.to(tl.float32)
        visible = (tok[None, :] < limit[:, None]) & tok_ok[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))

        # (3) online softmax, base 2. m_i starts at a finite floor, so a row that sees nothing yet
        # gets p = 0 and alpha = 1 instead of NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1, keep_dims=True))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1, keep_dims=True)
        acc = acc * alpha

        # (4) values: per value rank, (p * a_v) B_v.
        for rv in tl.static_range(R_V):
            a_v = tl.load(av_tok[None, :] + rv * s_av_r + r_h[:, None] * s_av_h,
                          mask=h_ok[:, None] & tok_ok[None, :], other=0.0)  # [ROWS, BLOCK_M]
            v = tl.load(bv_tok[:, None] + rv * s_bv_r + offs_e[None, :] * s_bv_e,
                        mask=tok_ok[:, None] & e_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_E]
            w = _round_bf16_jit(p * a_v.to(tl.float32), FIX_BF16).to(v.dtype)
            if IEEE_DOT:
                acc += tl.dot(w.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w, v)
        m_i = m_new

    m_i = tl.reshape(m_i, [ROWS])
    l_i = tl.reshape(l_i, [ROWS])
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    lse2 = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))  # log2 domain
    row_bnh = (b64 * N + r_n) * H + r_h  # index of (b, n, h) in [B, N, H]
    if not SPLIT:
        o = acc * (out_scale / l_safe)[:, None]
        o_ptr = OUT + row_bnh[:, None] * E + offs_e[None, :]
        tl.store(o_ptr, _round_bf16_jit(o, FIX_BF16).to(OUT.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])
        if WRITE_LSE:
            tl.store(LSE + row_bnh, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        o = acc / l_safe[:, None]
        part = row_bnh * num_splits + pid_s
        tl.store(O_PART + part[:, None] * E + offs_e[None, :], o, mask=row_ok[:, None] & e_ok[None, :])
        tl.store(LSE_PART + part, lse2, mask=row_ok)


def _tpa_decode_merge_kernel(
    O_PART, LSE_PART, OUT, LSE,
    num_splits, out_scale,
    E: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    WRITE_LSE: tl.constexpr, FIX_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the splits of one (b, n, h) row with a float32 log-sum-exp.

    All loads are independent of each other (the split loop is unrolled in chunks of CHUNK_S), so
    the row costs about one memory round trip, not one per split. With PDL the kernel is launched
    while the split kernel still runs (programmatic dependent launch) and waits here for its
    results, which hides the launch latency."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(LSE_PART + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.math.exp2(lse - m_use), axis=0)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_S, CHUNK_S):
        offs_c = c + tl.arange(0, CHUNK_S)
        c_ok = offs_c < num_splits
        lse_c = tl.load(LSE_PART + row * num_splits + offs_c, mask=c_ok, other=float("-inf"))
        o_c = tl.load(O_PART + (row * num_splits + offs_c)[:, None] * E + offs_e[None, :],
                      mask=c_ok[:, None] & e_ok[None, :], other=0.0)
        acc += tl.sum(tl.math.exp2(lse_c - m_use)[:, None] * o_c, axis=0)
    has = l > 0.0
    l_safe = tl.where(has, l, 1.0)
    out = acc * (out_scale / l_safe)
    tl.store(OUT + row * E + offs_e, _round_bf16_jit(out, FIX_BF16).to(OUT.dtype.element_ty), mask=e_ok)
    if WRITE_LSE:
        tl.store(LSE + row, tl.where(has, m_use + tl.math.log2(l_safe), float("-inf")) * 0.6931471805599453)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The two kernels, wrapped by ``triton.jit`` on first use (interpreted under TRITON_INTERPRET=1)."""
    import triton
    import triton.language as language

    globals()["tl"] = language
    globals()["_round_bf16_jit"] = triton.jit(_round_bf16)
    # ``capacity`` and ``N`` vary at run time without changing the code: never specialise on them.
    split = triton.jit(_tpa_decode_split_kernel, do_not_specialize=["N", "capacity", "num_splits"])
    merge = triton.jit(_tpa_decode_merge_kernel, do_not_specialize=["num_splits"])
    return split, merge


def triton_interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    import triton.language as language

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(language.zeros, InterpretedFunction)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Launch parameters: from shapes only (never from cache_seqlens values).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. ``None`` fields are filled by :func:`default_config`.

    Attributes:
        block_m: cache tokens per loop iteration (power of two, >= 16).
        block_h: heads per program (power of two; heads beyond H are masked).
        block_n: queries per program (power of two).
        num_splits: KV splits per (sequence, head/query tile); 1 writes the output directly and
            skips the merge kernel.
        num_warps, num_stages: Triton launch options of the split kernel.
    """

    block_m: int | None = None
    block_h: int | None = None
    block_n: int | None = None
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# Programmatic dependent launch of the merge kernel (Hopper and later): it starts while the split
# kernel finishes and waits on-device for its results. A switch for A/B measurements.
_USE_PDL = True
# With PDL and a split grid that fits on the SMs at once, the split kernel triggers the merge
# kernel's launch as it starts, instead of as its programs finish.
_EARLY_LAUNCH = True


@functools.lru_cache(maxsize=16)
def _pdl_supported(device: torch.device) -> bool:
    import triton.language as language

    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(language.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
) -> DecodeConfig:
    """Pick launch parameters from shapes alone (the cache capacity, never the current lengths).

    Heads and queries of one program share every cache byte it loads, so a program takes all heads
    when its tiles stay small (rows x max(D, E) <= 8K elements; more head blocks otherwise). The
    cache block and pipeline depth shrink until the staged tiles fit in shared memory. The number
    of splits aims at about ``programs_per_sm * num_sms`` programs (``_HEURISTIC``), with at least
    ``min_split_blocks`` blocks of capacity per split, at most 256 splits, and no empty split when
    the cache is full. Programs that stream at most two blocks are bound by memory latency, not
    bandwidth, and get 4 warps.
    """
    o = override or DecodeConfig()
    block_d, block_e = max(16, _next_pow2(d)), max(16, _next_pow2(e))
    max_rows = max(16, 8192 // max(block_d, block_e))
    block_h = o.block_h if o.block_h is not None else min(_next_pow2(num_heads), max_rows)
    if o.block_n is not None:
        block_n = o.block_n
    else:
        block_n = 1 if num_queries == 1 else min(_next_pow2(num_queries), max(1, max_rows // block_h))
    if block_h * block_n < 16:  # tl.dot needs at least 16 rows
        block_h = max(block_h, 16 // block_n)
    rows = block_h * block_n
    tune = _HEURISTIC
    block_m = o.block_m if o.block_m is not None else (tune["block_m"] if element_size <= 2 else tune["block_m"] // 2)
    num_stages = o.num_stages if o.num_stages is not None else tune["num_stages"]

    def staged_bytes(bm: int, stages: int) -> int:  # upper estimate of the pipelined tiles
        return stages * bm * (k_rank * (block_d + rows) + v_rank * (block_e + rows)) * element_size

    budget = 160 * 1024
    if o.num_stages is None:
        while staged_bytes(block_m, num_stages) > budget and num_stages > 2:
            num_stages -= 1
    if o.block_m is None:
        while staged_bytes(block_m, num_stages) > budget and block_m > 16:
            block_m //= 2
    base = batch * math.ceil(num_queries / block_n) * math.ceil(num_heads / block_h)
    blocks = math.ceil(capacity / block_m)
    if o.num_splits is not None:
        num_splits = o.num_splits
    else:
        target = tune["programs_per_sm"] * num_sms
        most = max(1, blocks // tune.get("min_split_blocks", 1))
        num_splits = max(1, min(math.ceil(target / max(base, 1)), most, _MAX_SPLITS))
        # as many splits as it takes to cover the capacity in equal whole blocks: no empty split
        num_splits = math.ceil(blocks / math.ceil(blocks / num_splits))
    latency_bound = blocks <= 2 * num_splits  # each program streams at most two blocks
    if o.num_warps is not None:
        num_warps = o.num_warps
    elif tune["warps"] == "rows" and max(block_d, block_e) <= 128 and (k_rank + v_rank) * block_m <= 128:
        num_warps = 4 if latency_bound and rows <= 64 else min(8, max(2, rows // 16))
    else:
        num_warps = 4 if rows * max(block_d, block_e) <= 4096 else 8
    return DecodeConfig(block_m, block_h, block_n, num_splits, num_warps, num_stages)


# --------------------------------------------------------------------------------------------
# Host wrapper
# --------------------------------------------------------------------------------------------


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
):
    """Launch the Triton kernels on already validated inputs (see :func:`tpa_decode` for shapes).

    No host sync and no data-dependent Python: capturable in a CUDA graph once compiled.
    """
    bsz, n, r_q, h = a_q.shape
    d = b_q.shape[-1]
    r_k, r_v, e = a_k_cache.shape[2], a_v_cache.shape[2], b_v_cache.shape[-1]
    paged = block_table is not None
    if paged:
        page_size = a_k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        page_size = 1
        capacity = a_k_cache.shape[1]
    device = a_q.device
    interpret = device.type != "cuda"
    num_sms = 4 if interpret else _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    cfg = default_config(bsz, n, h, d, e, capacity, num_sms, b_k_cache.element_size(), config, r_k, r_v)
    if interpret and not triton_interpreter_active():
        raise RuntimeError(
            "tpa_decode: the Triton kernel on CPU tensors needs Triton's interpreter; set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    split_kernel, merge_kernel = _kernels()

    if out is None:
        out = torch.empty((bsz, n, h, e), dtype=a_q.dtype, device=device)
        if _POISON_BUFFERS:
            out.fill_(float("nan"))
    lse = torch.empty((bsz, n, h), dtype=torch.float32, device=device) if return_lse else None
    if lse is not None and _POISON_BUFFERS:
        lse.fill_(float("nan"))
    num_splits = cfg.num_splits
    if num_splits > 1:
        o_part = torch.empty((bsz, n, h, num_splits, e), dtype=torch.float32, device=device)
        lse_part = torch.empty((bsz, n, h, num_splits), dtype=torch.float32, device=device)
        if _POISON_BUFFERS:
            o_part.fill_(float("nan"))
            lse_part.fill_(float("nan"))
    else:
        o_part = lse_part = out  # unused
    lse_arg = lse if lse is not None else out  # unused when not WRITE_LSE
    bt = block_table if paged else cache_seqlens  # unused when not PAGED
    bt_stride = block_table.stride(0) if paged else 0

    fix_bf16 = interpret and a_q.dtype == torch.bfloat16
    caches = (a_k_cache, b_k_cache, a_v_cache, b_v_cache)
    block_h, block_n = cfg.block_h, cfg.block_n
    block_e = max(16, _next_pow2(e))
    grid = (num_splits, math.ceil(h / block_h) * math.ceil(n / block_n), bsz)
    pdl = num_splits > 1 and _USE_PDL and not interpret and _pdl_supported(device)
    split_kernel[grid](
        a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens, bt,
        out, lse_arg, o_part, lse_part,
        n, capacity, num_splits, softmax_scale * _LOG2E / (r_q * r_k), 1.0 / r_v,
        *a_q.stride(), *b_q.stride(),
        *a_k_cache.stride(), *b_k_cache.stride(), *a_v_cache.stride(), *b_v_cache.stride(),
        bt_stride,
        H=h, D=d, E=e, R_Q=r_q, R_K=r_k, R_V=r_v, R_PAD=max(_next_pow2(r_q), 16 // block_n),
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_M=cfg.block_m,
        BLOCK_D=max(16, _next_pow2(d)), BLOCK_E=block_e,
        SPLIT=num_splits > 1, PAGED=paged, PAGE_SIZE=page_size,
        # float32 factors: exact float32 products (no tf32). Under the interpreter every dot runs in
        # float32 on operands already rounded to the cache dtype (its bf16 dot is broken), which
        # equals a tensor-core dot with float32 accumulation up to summation order.
        WRITE_LSE=return_lse, IEEE_DOT=interpret or b_k_cache.dtype == torch.float32, FIX_BF16=fix_bf16,
        OFFS_64=(not paged) and capacity * max(abs(c.stride(1)) for c in caches) >= 2**31,
        EARLY_LAUNCH=pdl and _EARLY_LAUNCH and grid[0] * grid[1] * grid[2] <= num_sms,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        block_s = _next_pow2(num_splits)
        merge_kernel[(bsz * n * h,)](
            o_part, lse_part, out, lse_arg, num_splits, 1.0 / r_v,
            E=e, BLOCK_S=block_s, CHUNK_S=max(1, min(block_s, 4096 // block_e)), BLOCK_E=block_e,
            WRITE_LSE=return_lse, FIX_BF16=fix_bf16, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}),
        )
    return (out, lse) if return_lse else out


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
        cache_seqlens: ``[B]`` int32, valid cached tokens per sequence, the N new tokens included
            (they are written to the cache before the call). Query i of sequence b sees cache
            entries ``j < cache_seqlens[b] - N + 1 + i``. Requires ``N <= cache_seqlens[b] <= M``.
        block_table: optional ``[B, max_blocks]`` int32, physical block of each logical block;
            the capacity is then ``max_blocks * block_size``.
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

    Returns:
        ``out [B, N, H, E]`` in the dtype of ``a_q``; with ``return_lse``, ``(out, lse [B, N, H])``.

    Raises:
        TypeError: a non-tensor argument, unsupported or mismatched dtypes, ``cache_seqlens`` or
            ``block_table`` not int32.
        ValueError: mismatched shapes or devices, a length outside ``[N, capacity]`` where checked,
            an unknown backend.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"tpa_decode: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
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

    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"tpa_decode: cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"tpa_decode: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (bsz,):
        raise ValueError(f"tpa_decode: cache_seqlens must have shape [B]=[{bsz}], got {tuple(cache_seqlens.shape)}")

    num_blocks = None
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"tpa_decode: block_table must be a torch.Tensor, got {type(block_table).__name__}")
        if block_table.dtype != torch.int32:
            raise TypeError(f"tpa_decode: block_table must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != bsz:
            raise ValueError(f"tpa_decode: block_table must be [B, max_blocks] with B={bsz}, got {tuple(block_table.shape)}")
        if block_table.device != device:
            raise ValueError(f"tpa_decode: block_table is on {block_table.device}, a_q on {device}")
        num_blocks = lead[0]
        capacity = block_table.shape[1] * lead[1]
    else:
        if lead[0] != bsz:
            raise ValueError(f"tpa_decode: the caches' batch {lead[0]} must equal a_q's B={bsz} (or pass block_table)")
        capacity = lead[1]
    if n > capacity:
        raise ValueError(f"tpa_decode: N={n} query tokens do not fit in a cache of capacity {capacity}")

    if softmax_scale is None:
        softmax_scale = d ** -0.5
    softmax_scale = float(softmax_scale)

    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"tpa_decode: out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != (bsz, n, h, e) or out.dtype != dtype or out.device != device:
            raise ValueError(
                f"tpa_decode: out must be [B, N, H, E]={[bsz, n, h, e]} {dtype} on {device}, "
                f"got {list(out.shape)} {out.dtype} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError("tpa_decode: out must be contiguous")

    if check_lengths is None:
        check_lengths = cache_seqlens.device.type == "cpu"
    if check_lengths:
        check_cache_seqlens(cache_seqlens, capacity, n, block_table, num_blocks)

    if backend == "auto":
        use_triton = device.type == "cuda" and d <= _MAX_FEATURE_DIM and e <= _MAX_FEATURE_DIM and _triton_available()
    elif backend == "triton":
        if not _triton_available():
            raise RuntimeError("tpa_decode: backend='triton' needs the triton package")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"tpa_decode: backend='triton' runs on CUDA (or CPU via the interpreter), not {device}")
        use_triton = True
    else:
        use_triton = False

    if bsz == 0:
        result = out if out is not None else torch.empty((0, n, h, e), dtype=dtype, device=device)
        return (result, torch.empty((0, n, h), dtype=torch.float32, device=device)) if return_lse else result

    if use_triton:
        return tpa_decode_triton(
            a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens, block_table,
            softmax_scale, return_lse, out=out, config=config,
        )
    res = tpa_decode_reference(
        a_q, b_q, a_k_cache, b_k_cache, a_v_cache, b_v_cache, cache_seqlens,
        block_table=block_table, softmax_scale=softmax_scale, return_lse=return_lse,
    )
    o, lse = res if return_lse else (res, None)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_lse else o
