"""FlashTPA decoding kernels (the paper's Algorithm 2): the split kernel and the split merge.

Imported only where Triton is installed, on the first call of the Triton path (so that
``TRITON_INTERPRET=1``, set before that, makes ``triton.jit`` build interpreted kernels). The host
side (launch parameters, buffers, plans) is :mod:`tpa.ops.decode_launch`; the algorithm is described
in :mod:`tpa.ops.decode`. Annotations are strings (``from __future__ import annotations``), which
is what Triton reads for ``tl.constexpr``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpa.ops.kernels.common import round_bf16

__all__ = ["tpa_decode_merge_kernel", "tpa_decode_split_kernel"]


@triton.jit
def _head_factor(base, row_starts, tok_ok, r_h, a_ok, a_h, a_col_ok, s_h, pick,
                 A_DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One rank's head factor of one block for every row of the tile, float32 ``[ROWS, BLOCK_M]``:
    element (row, token) is the factor of the row's head ``r_h`` at that token (``base + row_starts``
    are the tokens' row starts of this rank, ``s_h`` the head stride). ``A_DOT``: a ``[A_COLS, BLOCK_M]``
    tile of the block's heads ``a_h`` spread over the rows by the one-hot ``pick [ROWS, A_COLS]``, exactly
    (one product by 1, the rest by 0); otherwise one load per row."""
    if A_DOT:
        a_t = tl.load(base + row_starts[None, :] + a_h[:, None] * s_h,
                      mask=a_col_ok[:, None] & tok_ok[None, :], other=0.0)
        if IEEE_DOT:
            return tl.dot(pick.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
        return tl.dot(pick, a_t)
    return tl.load(base + row_starts[None, :] + r_h[:, None] * s_h,
                   mask=a_ok[:, None] & tok_ok[None, :], other=0.0).to(tl.float32)


# ``capacity`` and ``N`` vary at run time without changing the code: never specialise on them.
@triton.jit(do_not_specialize=["N", "capacity", "num_splits"])
def tpa_decode_split_kernel(
    AQ, BQ, AK, BK, AV, BV, SEQLENS, BLOCK_TABLE,
    OUT, LSE, O_PART, LSE_PART, TIMES,
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
    EARLY_LAUNCH: tl.constexpr, A_HEADS: tl.constexpr, HEADS_INNER: tl.constexpr, A_ALIGN: tl.constexpr,
    TIMELINE: tl.constexpr, A_DOT: tl.constexpr,
):
    """One (split, head/query tile, sequence). Rows of every tile are (query, head) pairs:
    row = n_local * BLOCK_H + h_local. For a contiguous cache the ``*_b`` strides step over
    sequences and ``*_m`` over tokens; for a paged cache ``*_b`` steps over physical blocks and
    ``*_m`` over tokens within a block.

    Why it is one long function: a Triton kernel is one program per grid cell; a helper
    ``@triton.jit`` function is inlined anyway, and the sections share the tile's row/column
    indices, masks and running softmax state (``m_i``, ``l_i``, ``acc``), which a split would pass
    around as a dozen tensors. Its sections, in order:

    1. the program's tile: split, head block and query block from the grid; row/column offsets and masks;
    2. this split's token range ``[lo, hi)`` of the sequence (length clamped to ``capacity``) and the
       causal limit of each row;
    3. the tile's queries from their factors, ``q = A_q B_q`` as one block-diagonal ``tl.dot``;
    4. the loop over ``BLOCK_M`` tokens: token addresses (paged or contiguous), then Algorithm 2's
       steps (1)+(2) logits per key rank, (3) the base-2 online softmax, (4) values per value rank;
    5. the epilogue: the log-sum-exp, then either the final output (``SPLIT`` false) or this split's
       partial output and log-sum-exp for :func:`tpa_decode_merge_kernel`.

    ``A_HEADS`` (>= H) is the number of heads per row the loads of the cache's head factors ``a_k``
    and ``a_v`` may read: H, or the padded row width of a layout whose rows hold more (see
    :class:`tpa.ops.decode.DecodeLaunchOptions`). Heads in ``[H, A_HEADS)`` are read and discarded
    (their rows never mix with others and are not stored); a mask at a multiple of 8 or 16 keeps the
    loads vectorisable where a mask at H = 34 (divisible by 2 only) limits them to 2 elements.
    ``HEADS_INNER`` swaps the first two grid axes, so that the head blocks of one split, which read
    the same tokens' head-shared factors ``b_k`` and ``b_v``, run at the same time and can share them
    through L2 instead of each reading them from memory.

    ``A_ALIGN`` is a power of two (elements) that divides every offset of an ``a_k``/``a_v`` row start
    (the host's :func:`tpa.ops.decode_launch.a_row_alignment`): Triton infers the alignment of the
    row starts only from strides divisible by 16, so at H = 34 (rows of 68 elements) it would load
    the head factors one element at a time; with the hint it loads them as wide as the mask allows.

    ``A_DOT`` (:attr:`tpa.ops.decode.DecodeLaunchOptions.a_dot`) loads each rank's head factors as a
    ``[A_COLS, BLOCK_M]`` tile of this block's heads (masked at H) and spreads them over the rows with a
    one-hot ``tl.dot`` (``pick``, exact): a load that feeds a dot is software-pipelined through shared
    memory, where a load used elementwise is staged in registers across the pipeline's stages.

    ``TIMELINE`` (a profiling hook, :attr:`tpa.ops.decode.DecodeLaunchOptions.timeline`) stores, per
    program, the GPU's nanosecond clock at its start, after its queries, after its loop and at its
    end, and its SM, in ``TIMES`` (int64 ``[programs, 5]``, programs in launch order).
    """
    if TIMELINE:
        t_start = tl.extra.cuda.globaltimer()
    if EARLY_LAUNCH:  # let the merge kernel (launched with PDL) start now; it waits for our results
        tl.extra.cuda.gdc_launch_dependents()
    # float scalars arrive as fp64 when inductor launches the kernel (torch.ops.tpa.decode under
    # torch.compile): keep the float32 accumulators float32
    scale_log2 = tl.cast(scale_log2, tl.float32)
    out_scale = tl.cast(out_scale, tl.float32)
    if HEADS_INNER:  # grid (head/query tiles, splits, B): the tiles of one split are launched side by side
        pid_hq = tl.program_id(0)
        pid_s = tl.program_id(1)
    else:  # grid (splits, head/query tiles, B)
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
    a_ok = r_h < A_HEADS  # the head-factor loads (== h_ok unless the A rows are padded)
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
    q = round_bf16(q, FIX_BF16).to(kv_dtype)
    if TIMELINE:
        t_query = tl.extra.cuda.globaltimer()

    # A_DOT's head columns and one-hot rows: pick[row, c] = 1 where column c is the row's head (unused,
    # and compiled away, without A_DOT; through tl.where: the interpreter casts booleans to bfloat16 as 0)
    A_COLS: tl.constexpr = BLOCK_H if BLOCK_H >= 16 else 16
    offs_a = tl.arange(0, A_COLS)
    a_h = hb * BLOCK_H + offs_a
    a_col_ok = (offs_a < BLOCK_H) & (a_h < H)
    pick = tl.where((rows % BLOCK_H)[:, None] == offs_a[None, :], 1.0, 0.0).to(kv_dtype)  # [ROWS, A_COLS]

    acc = tl.zeros([ROWS, BLOCK_E], dtype=tl.float32)
    m_i = tl.full([ROWS, 1], -3.0e38, dtype=tl.float32)
    l_i = tl.zeros([ROWS, 1], dtype=tl.float32)

    if not PAGED:
        ak_b = b64 * s_ak_b
        av_b = b64 * s_av_b
        if A_ALIGN > 1:
            ak_b = tl.multiple_of(ak_b, A_ALIGN)
            av_b = tl.multiple_of(av_b, A_ALIGN)
        ak_base = AK + ak_b
        bk_base = BK + b64 * s_bk_b
        av_base = AV + av_b
        bv_base = BV + b64 * s_bv_b
        if OFFS_64:  # rank offsets too: a rank-major view ([B, R, M, X] storage) strides ranks by M * X
            s_ak_r = s_ak_r.to(tl.int64)
            s_bk_r = s_bk_r.to(tl.int64)
            s_av_r = s_av_r.to(tl.int64)
            s_bv_r = s_bv_r.to(tl.int64)

    for start in range(lo, hi, BLOCK_M):
        tok = start + offs_m
        tok_ok = tok < hi
        if PAGED:
            blk = tl.load(BLOCK_TABLE + b64 * s_bt_b + tok // PAGE_SIZE, mask=tok_ok, other=0).to(tl.int64)
            in_blk = tok % PAGE_SIZE
            ak_tok = AK
            ak_row = blk * s_ak_b + in_blk * s_ak_m
            bk_tok = BK + blk * s_bk_b + in_blk * s_bk_m
            av_tok = AV
            av_row = blk * s_av_b + in_blk * s_av_m
            if A_ALIGN > 1:
                ak_row = tl.multiple_of(ak_row, [A_ALIGN])
                av_row = tl.multiple_of(av_row, [A_ALIGN])
            bv_tok = BV + blk * s_bv_b + in_blk * s_bv_m
        else:
            if OFFS_64:  # token offsets beyond 2^31 elements in a huge cache
                tok_o = tok.to(tl.int64)
            else:
                tok_o = tok
            ak_tok = ak_base
            ak_row = tok_o * s_ak_m
            bk_tok = bk_base + tok_o * s_bk_m
            av_tok = av_base
            av_row = tok_o * s_av_m
            if A_ALIGN > 1:
                ak_row = tl.multiple_of(ak_row, [A_ALIGN])
                av_row = tl.multiple_of(av_row, [A_ALIGN])
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
            ak_rank = ak_row + rk * s_ak_r  # row starts of this rank's a_k
            if A_ALIGN > 1:
                ak_rank = tl.multiple_of(ak_rank, [A_ALIGN])
            a_k = _head_factor(ak_tok, ak_rank, tok_ok, r_h, a_ok, a_h, a_col_ok, s_ak_h, pick,
                               A_DOT, IEEE_DOT)  # [ROWS, BLOCK_M]
            s += qk * a_k
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
            av_rank = av_row + rv * s_av_r
            if A_ALIGN > 1:
                av_rank = tl.multiple_of(av_rank, [A_ALIGN])
            a_v = _head_factor(av_tok, av_rank, tok_ok, r_h, a_ok, a_h, a_col_ok, s_av_h, pick,
                               A_DOT, IEEE_DOT)  # [ROWS, BLOCK_M]
            v = tl.load(bv_tok[:, None] + rv * s_bv_r + offs_e[None, :] * s_bv_e,
                        mask=tok_ok[:, None] & e_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_E]
            w = round_bf16(p * a_v, FIX_BF16).to(v.dtype)
            if IEEE_DOT:
                acc += tl.dot(w.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w, v)
        m_i = m_new

    if TIMELINE:
        t_loop = tl.extra.cuda.globaltimer()
    m_i = tl.reshape(m_i, [ROWS])
    l_i = tl.reshape(l_i, [ROWS])
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    lse2 = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))  # log2 domain
    row_bnh = (b64 * N + r_n) * H + r_h  # index of (b, n, h) in [B, N, H]
    if not SPLIT:
        o = acc * (out_scale / l_safe)[:, None]
        o_ptr = OUT + row_bnh[:, None] * E + offs_e[None, :]
        tl.store(o_ptr, round_bf16(o, FIX_BF16).to(OUT.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])
        if WRITE_LSE:
            tl.store(LSE + row_bnh, lse2 * 0.6931471805599453, mask=row_ok)
    else:
        o = acc / l_safe[:, None]
        part = row_bnh * num_splits + pid_s
        tl.store(O_PART + part[:, None] * E + offs_e[None, :], o, mask=row_ok[:, None] & e_ok[None, :])
        tl.store(LSE_PART + part, lse2, mask=row_ok)
    if TIMELINE:
        t_end = tl.extra.cuda.globaltimer()
        if HEADS_INNER:
            program = pid_hq + tl.num_programs(0) * (pid_s + tl.num_programs(1) * b64)
        else:
            program = pid_s + tl.num_programs(0) * (pid_hq + tl.num_programs(1) * b64)
        times = TIMES + program * 5
        tl.store(times, t_start)
        tl.store(times + 1, t_query)
        tl.store(times + 2, t_loop)
        tl.store(times + 3, t_end)
        tl.store(times + 4, tl.extra.cuda.smid().to(tl.int64))


@triton.jit(do_not_specialize=["num_splits"])
def tpa_decode_merge_kernel(
    O_PART, LSE_PART, OUT, LSE,
    num_splits, out_scale,
    E: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    WRITE_LSE: tl.constexpr, FIX_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the splits of one (b, n, h) row with a float32 log-sum-exp: program (row, slab) writes
    the row's output columns ``[slab * BLOCK_E, (slab + 1) * BLOCK_E)`` (a row of many splits is
    merged by several programs, each reading its slab of every split's partial output).

    All loads are independent of each other (the split loop is unrolled in chunks of CHUNK_S), so
    the row costs about one memory round trip, not one per split. With PDL the kernel is launched
    while the split kernel still runs (programmatic dependent launch) and waits here for its
    results, which hides the launch latency."""
    out_scale = tl.cast(out_scale, tl.float32)  # fp64 when inductor launches the kernel
    if PDL:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    slab = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(LSE_PART + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.math.exp2(lse - m_use), axis=0)
    offs_e = slab * BLOCK_E + tl.arange(0, BLOCK_E)
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
    tl.store(OUT + row * E + offs_e, round_bf16(out, FIX_BF16).to(OUT.dtype.element_ty), mask=e_ok)
    if WRITE_LSE:
        if slab == 0:
            tl.store(LSE + row, tl.where(has, m_use + tl.math.log2(l_safe), float("-inf")) * 0.6931471805599453)
