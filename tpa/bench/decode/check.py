"""Correctness of the decode kernel on the GPU."""

from __future__ import annotations

from tpa.bench.decode.inputs import tpa_inputs


def reference_f64(torch, a_q, b_q, a_k, b_k, a_v, b_v, seqlens, block_table=None):
    """Float64 ground truth with Q, K, V materialised, per sequence (independent of the twin)."""
    from tpa.ops.naive import gather_paged

    if block_table is not None:
        a_k, b_k, a_v, b_v = (gather_paged(c, block_table) for c in (a_k, b_k, a_v, b_v))
    f = torch.float64
    a_q, b_q, a_k, b_k, a_v, b_v = (t.to(f) for t in (a_q, b_q, a_k, b_k, a_v, b_v))
    n = a_q.shape[1]
    outs = []
    for b, length in enumerate(seqlens.tolist()):
        q = torch.einsum("nrh,nrd->nhd", a_q[b], b_q[b]) / a_q.shape[2]
        k = torch.einsum("mrh,mrd->mhd", a_k[b, :length], b_k[b, :length]) / a_k.shape[2]
        v = torch.einsum("mrh,mre->mhe", a_v[b, :length], b_v[b, :length]) / a_v.shape[2]
        logits = torch.einsum("nhd,mhd->hnm", q, k) * b_q.shape[-1] ** -0.5
        limit = length - n + 1 + torch.arange(n, device=q.device)
        vis = torch.arange(length, device=q.device)[None, :] < limit[:, None]
        logits = logits.masked_fill(~vis[None], float("-inf"))
        outs.append(torch.einsum("hnm,mhe->nhe", torch.softmax(logits, -1), v))
    return torch.stack(outs)


def check_correctness(torch, log):
    """Kernel vs a float64 computation on the GPU (NaN-poisoned outputs), then CUDA-graph replay at
    other lengths. Bound: float32 1e-5 absolute; half precision 4x the error of merely rounding the
    float64 result to the dtype (which no computation at that dtype can beat), plus a floor. The
    stricter FlashAttention rule is applied by tests/ops/test_decode.py."""
    from tpa.ops import tpa_decode

    cases = [
        # (lengths, n, h, d, ranks, dtype, paged_block)
        ([1, 37, 1000, 4096], 1, 32, 64, (16, 1, 1), torch.bfloat16, None),
        ([1, 37, 1000, 4096], 1, 32, 64, (6, 2, 2), torch.bfloat16, None),
        ([5, 999, 3001], 1, 34, 80, (3, 2, 3), torch.float16, None),
        ([5, 999, 3001], 4, 78, 64, (2, 1, 2), torch.bfloat16, 16),
        ([7, 1500], 1, 78, 256, (1, 2, 1), torch.bfloat16, None),
        ([9, 700, 2049], 4, 34, 80, (3, 3, 1), torch.float32, None),
        ([9, 700, 2049], 1, 48, 64, (16, 1, 1), torch.float32, 256),
    ]
    ok = True
    for lengths, n, h, d, ranks, dtype, pb in cases:
        cap = max(lengths) + 5
        bsz = len(lengths)
        inputs = list(tpa_inputs(torch, bsz, 1, h, d, ranks, dtype, n=n, capacity=cap, paged_block=pb))
        inputs[6] = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        out = torch.full((bsz, n, h, d), float("nan"), dtype=dtype, device="cuda")
        res, lse = tpa_decode(*inputs[:7], block_table=inputs[7], return_lse=True, backend="triton", out=out)
        torch.cuda.synchronize()
        ref = reference_f64(torch, *inputs[:7], inputs[7])
        err = (out.double() - ref).abs().max().item()
        # PyTorch at this dtype cannot do better than rounding the exact result to the dtype.
        round_err = (ref.to(dtype).double() - ref).abs().max().item()
        bound = {torch.float32: 1e-5, torch.float16: 4 * round_err + 1e-3, torch.bfloat16: 4 * round_err + 1e-2}[dtype]
        nan = bool(torch.isnan(out).any() or torch.isnan(lse).any())
        passed = (not nan) and err <= bound
        ok &= passed
        log(f"  check lengths={lengths} N={n} H={h} D={d} R={ranks} {str(dtype)[6:]} paged={pb}: "
            f"max err {err:.3g} (bound {bound:.3g}, rounding {round_err:.3g}) {'ok' if passed else 'FAIL'}")
    # CUDA graph: capture at one length, replay at others (the lengths live in a device buffer).
    inputs = list(tpa_inputs(torch, 2, 4096, 32, 64, (16, 1, 1), torch.bfloat16, capacity=8192))
    seqlens = inputs[6]
    out = torch.empty(2, 1, 32, 64, dtype=torch.bfloat16, device="cuda")
    tpa_decode(*inputs[:7], out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tpa_decode(*inputs[:7], out=out)
    for lens in ([4096, 100], [8192, 1], [3, 5000]):
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        eager = tpa_decode(*inputs[:7])
        torch.cuda.synchronize()
        same = torch.equal(out, eager)
        ok &= same
        log(f"  CUDA graph captured at [4096, 4096], replayed at {lens}: {'equal to eager' if same else 'DIFFERENT'}")
    return ok
