"""Fused materialisation kernels: Q, K or V from TPA factors (forward) and the factor gradients
(backward), for up to three factor pairs per launch.

Imported only where Triton is installed, on the first call of the Triton path (see
:mod:`tpa.ops.kernels.decode`). The host side and the description of the computation are in
:mod:`tpa.ops.fused_materialize`. Inductor, launching these kernels inside the ``triton_op``, emits
each ``triton.jit`` helper's source under the name the kernels call it by.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpa.ops.kernels.common import round_bf16

__all__ = ["materialize_bwd_kernel", "materialize_fwd_kernel"]

# token counts vary with batch and sequence length: never specialise on them
_TOKEN_COUNTS = [f"{x}{p}" for x in "NT" for p in range(3)]


# Per-part bodies (inlined ``triton.jit`` helpers): one (A, B) -> OUT product, or one backward, for
# the tokens ``pid * BLOCK_T + [0, BLOCK_T)`` of that part.


@triton.jit
def _fwd_part(
    pid, A, B, OUT, n_tok, seq, scale_hi, scale_lo,
    s_a_b, s_a_t, s_a_r, s_b_b, s_b_t, s_b_r,
    R: tl.constexpr, H: tl.constexpr, D: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """OUT [n_tok, H, D] contiguous = scale * sum_r A[tok, r, :, None] * B[tok, r, None, :].

    Token ``tok`` is (batch ``tok // seq``, time ``tok % seq``); A and B have unit stride in their
    last dimension. ``scale = scale_hi + scale_lo`` (two float32 parts, exact enough for float64).
    DOT: per token a ``[BLOCK_H, R_PAD] x [R_PAD, BLOCK_D]`` tensor-core product (16-bit inputs,
    exact products, float32 sums; ranks beyond R are zero). Otherwise broadcast products in ACC.
    IEEE (the interpreter): the products in float32 on operands upcast from 16 bits."""
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: B * T < 2**31 is checked by the launcher
    t_ok = tok < n_tok
    bi = tok // seq
    ti = tok - bi * seq
    a_tok = A + bi.to(tl.int64) * s_a_b + ti.to(tl.int64) * s_a_t  # [BLOCK_T] pointers
    b_tok = B + bi.to(tl.int64) * s_b_b + ti.to(tl.int64) * s_b_t
    o_tok = OUT + tok.to(tl.int64) * (H * D)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    if DOT:
        b3 = tl.load(b_tok[:, None, None] + offs_r[None, :, None] * s_b_r + offs_d[None, None, :],
                     mask=t_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :], other=0.0)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        if DOT:
            a3 = tl.load(a_tok[:, None, None] + offs_r[None, None, :] * s_a_r + offs_h[None, :, None],
                         mask=t_ok[:, None, None] & h_ok[None, :, None] & r_ok[None, None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a3.to(tl.float32), b3.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a3, b3)  # [BLOCK_T, BLOCK_H, BLOCK_D]
        else:
            acc = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], dtype=ACC)
            for r in tl.static_range(R):
                a_r = tl.load(a_tok[:, None] + r * s_a_r + offs_h[None, :],
                              mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(ACC)  # [BLOCK_T, BLOCK_H]
                b_r = tl.load(b_tok[:, None] + r * s_b_r + offs_d[None, :],
                              mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)  # [BLOCK_T, BLOCK_D]
                acc += a_r[:, :, None] * b_r[:, None, :]
        out = round_bf16(acc * scale, FIX_BF16)
        o_ptr = o_tok[:, None, None] + offs_h[None, :, None] * D + offs_d[None, None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty),
                 mask=t_ok[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :])


@triton.jit
def _bwd_part(
    pid, G, A, B, GA, GB, n_tok, seq, scale_hi, scale_lo,
    s_g_b, s_g_t, s_g_h, s_a_b, s_a_t, s_a_r, s_b_b, s_b_t, s_b_r,
    R: tl.constexpr, H: tl.constexpr, D: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """GA [n_tok, R, H] = scale * sum_d G[tok, :, d] B[tok, r, d];
    GB [n_tok, R, D] = scale * sum_h G[tok, h, :] A[tok, r, h] (GA, GB contiguous).

    The output gradient of a head block is loaded once and both gradients are reduced from it.
    DOT (16-bit inputs): per token ``G [BLOCK_H, BLOCK_D] x B^T [BLOCK_D, R_PAD]`` and
    ``A^T [R_PAD, BLOCK_H] x G [BLOCK_H, BLOCK_D]`` on tensor cores, GB accumulating across head
    blocks in the product's float32 accumulator. Otherwise broadcast products and sums in ACC: with
    one head block (``BLOCK_H >= H``) GB rows are stored as reduced, else they accumulate in a
    ``[BLOCK_T, R_PAD, BLOCK_D]`` tile (row r selected by a mask)."""
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tok < n_tok
    bi = tok // seq
    ti = tok - bi * seq
    bi64 = bi.to(tl.int64)
    ti64 = ti.to(tl.int64)
    g_tok = G + bi64 * s_g_b + ti64 * s_g_t
    a_tok = A + bi64 * s_a_b + ti64 * s_a_t
    b_tok = B + bi64 * s_b_b + ti64 * s_b_t
    ga_tok = GA + tok.to(tl.int64) * (R * H)
    gb_tok = GB + tok.to(tl.int64) * (R * D)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    out_ty = GA.dtype.element_ty
    gb_acc = tl.zeros([BLOCK_T, R_PAD, BLOCK_D], dtype=ACC)
    if DOT:
        b_t = tl.load(b_tok[:, None, None] + offs_r[None, None, :] * s_b_r + offs_d[None, :, None],
                      mask=t_ok[:, None, None] & d_ok[None, :, None] & r_ok[None, None, :], other=0.0)  # [BT, BD, RP]
        if IEEE:
            b_t = b_t.to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        th_ok = t_ok[:, None] & h_ok[None, :]
        g = tl.load(g_tok[:, None, None] + offs_h.to(tl.int64)[None, :, None] * s_g_h + offs_d[None, None, :],
                    mask=th_ok[:, :, None] & d_ok[None, None, :], other=0.0)  # [BT, BH, BD]
        if DOT:
            a_t = tl.load(a_tok[:, None, None] + offs_r[None, :, None] * s_a_r + offs_h[None, None, :],
                          mask=t_ok[:, None, None] & r_ok[None, :, None] & h_ok[None, None, :], other=0.0)
            if IEEE:
                g = g.to(tl.float32)
                ga = tl.dot(g, b_t, input_precision="ieee")  # [BT, BH, RP]
                gb_acc = tl.dot(a_t.to(tl.float32), g, gb_acc, input_precision="ieee")  # [BT, RP, BD]
            else:
                ga = tl.dot(g, b_t)
                gb_acc = tl.dot(a_t, g, gb_acc)
            ga = round_bf16(ga * scale, FIX_BF16)
            tl.store(ga_tok[:, None, None] + offs_r[None, None, :] * H + offs_h[None, :, None], ga.to(out_ty),
                     mask=th_ok[:, :, None] & r_ok[None, None, :])
        else:
            g = g.to(ACC)
            for r in tl.static_range(R):
                a_r = tl.load(a_tok[:, None] + r * s_a_r + offs_h[None, :], mask=th_ok, other=0.0).to(ACC)
                b_r = tl.load(b_tok[:, None] + r * s_b_r + offs_d[None, :],
                              mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
                ga = round_bf16(tl.sum(g * b_r[:, None, :], axis=2) * scale, FIX_BF16)  # [BT, BH]
                tl.store(ga_tok[:, None] + r * H + offs_h[None, :], ga.to(out_ty), mask=th_ok)
                part = tl.sum(g * a_r[:, :, None], axis=1)  # [BT, BD]
                if BLOCK_H >= H:  # one head block: this row of GB is complete
                    gb = round_bf16(part * scale, FIX_BF16)
                    tl.store(gb_tok[:, None] + r * D + offs_d[None, :], gb.to(out_ty),
                             mask=t_ok[:, None] & d_ok[None, :])
                else:
                    gb_acc += tl.where(offs_r[None, :, None] == r, part[:, None, :], 0.0)
    if DOT or BLOCK_H < H:
        gb = round_bf16(gb_acc * scale, FIX_BF16)
        tl.store(gb_tok[:, None, None] + offs_r[None, :, None] * D + offs_d[None, None, :], gb.to(out_ty),
                 mask=t_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :])


# The kernels: up to three parts (Q, K, V) in one launch. Program ``pid`` does its token block of
# every part in turn (the parts are unrolled at compile time, so each keeps its own constexpr rank
# and feature size); a part with fewer tokens than the grid covers masks its extra blocks off.


@triton.jit(do_not_specialize=_TOKEN_COUNTS)
def materialize_fwd_kernel(
    A0, B0, O0, N0, T0, HI0, LO0, SA0_B, SA0_T, SA0_R, SB0_B, SB0_T, SB0_R,
    A1, B1, O1, N1, T1, HI1, LO1, SA1_B, SA1_T, SA1_R, SB1_B, SB1_T, SB1_R,
    A2, B2, O2, N2, T2, HI2, LO2, SA2_B, SA2_T, SA2_R, SB2_B, SB2_T, SB2_R,
    PARTS: tl.constexpr, H: tl.constexpr,
    R0: tl.constexpr, D0: tl.constexpr, RP0: tl.constexpr, BD0: tl.constexpr,
    R1: tl.constexpr, D1: tl.constexpr, RP1: tl.constexpr, BD1: tl.constexpr,
    R2: tl.constexpr, D2: tl.constexpr, RP2: tl.constexpr, BD2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FP64: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """Part p: ``O_p [N_p, H, D_p] = (HI_p + LO_p) * sum_r A_p[tok, r, :, None] * B_p[tok, r, None, :]``
    for tokens ``tok < N_p`` of sequences of length ``T_p`` (see ``_fwd_part``)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    _fwd_part(pid, A0, B0, O0, N0, T0, HI0, LO0, SA0_B, SA0_T, SA0_R, SB0_B, SB0_T, SB0_R,
                  R0, H, D0, RP0, BLOCK_T, BLOCK_H, BD0, DOT, IEEE, ACC, FIX_BF16)
    if PARTS > 1:
        _fwd_part(pid, A1, B1, O1, N1, T1, HI1, LO1, SA1_B, SA1_T, SA1_R, SB1_B, SB1_T, SB1_R,
                      R1, H, D1, RP1, BLOCK_T, BLOCK_H, BD1, DOT, IEEE, ACC, FIX_BF16)
    if PARTS > 2:
        _fwd_part(pid, A2, B2, O2, N2, T2, HI2, LO2, SA2_B, SA2_T, SA2_R, SB2_B, SB2_T, SB2_R,
                      R2, H, D2, RP2, BLOCK_T, BLOCK_H, BD2, DOT, IEEE, ACC, FIX_BF16)


@triton.jit(do_not_specialize=_TOKEN_COUNTS)
def materialize_bwd_kernel(
    G0, A0, B0, GA0, GB0, N0, T0, HI0, LO0, SG0_B, SG0_T, SG0_H, SA0_B, SA0_T, SA0_R, SB0_B, SB0_T, SB0_R,
    G1, A1, B1, GA1, GB1, N1, T1, HI1, LO1, SG1_B, SG1_T, SG1_H, SA1_B, SA1_T, SA1_R, SB1_B, SB1_T, SB1_R,
    G2, A2, B2, GA2, GB2, N2, T2, HI2, LO2, SG2_B, SG2_T, SG2_H, SA2_B, SA2_T, SA2_R, SB2_B, SB2_T, SB2_R,
    PARTS: tl.constexpr, H: tl.constexpr,
    R0: tl.constexpr, D0: tl.constexpr, RP0: tl.constexpr, BD0: tl.constexpr,
    R1: tl.constexpr, D1: tl.constexpr, RP1: tl.constexpr, BD1: tl.constexpr,
    R2: tl.constexpr, D2: tl.constexpr, RP2: tl.constexpr, BD2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, FP64: tl.constexpr, FIX_BF16: tl.constexpr,
):
    """Part p: ``GA_p`` and ``GB_p`` from the output gradient ``G_p`` (see ``_bwd_part``)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    _bwd_part(pid, G0, A0, B0, GA0, GB0, N0, T0, HI0, LO0, SG0_B, SG0_T, SG0_H,
                  SA0_B, SA0_T, SA0_R, SB0_B, SB0_T, SB0_R, R0, H, D0, RP0, BLOCK_T, BLOCK_H, BD0,
                  DOT, IEEE, ACC, FIX_BF16)
    if PARTS > 1:
        _bwd_part(pid, G1, A1, B1, GA1, GB1, N1, T1, HI1, LO1, SG1_B, SG1_T, SG1_H,
                      SA1_B, SA1_T, SA1_R, SB1_B, SB1_T, SB1_R, R1, H, D1, RP1, BLOCK_T, BLOCK_H, BD1,
                      DOT, IEEE, ACC, FIX_BF16)
    if PARTS > 2:
        _bwd_part(pid, G2, A2, B2, GA2, GB2, N2, T2, HI2, LO2, SG2_B, SG2_T, SG2_H,
                      SA2_B, SA2_T, SA2_R, SB2_B, SB2_T, SB2_R, R2, H, D2, RP2, BLOCK_T, BLOCK_H, BD2,
                      DOT, IEEE, ACC, FIX_BF16)
