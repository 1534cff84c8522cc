"""GPU checks of both registrations of tpa_materialize_many, eager and compiled, against float64."""
import torch
from tpa.ops import fused_materialize as fm
from tpa.ops.naive import materialize as ref
torch.manual_seed(0)
dev = "cuda"
ok = True
for reg in ("custom_op", "triton_op"):
    fm._REGISTRATION = reg
    for dtype in (torch.bfloat16, torch.float32):
        for compiled in (False, True):
            torch._dynamo.reset()
            shapes = [(2, 37, 6, 34, 64), (2, 37, 2, 34, 64), (2, 37, 2, 34, 80)]
            pairs = []
            for bsz, t, r, h, d in shapes:
                buf = torch.randn(bsz, t, r * (h + d) + 3, device=dev, dtype=dtype)
                pairs.append((buf[..., : r * h].unflatten(-1, (r, h)).detach().requires_grad_(True),
                              buf[..., r * h + 3 :].unflatten(-1, (r, d)).detach().requires_grad_(True)))
            grads = [torch.randn(bsz, t, h, d, device=dev, dtype=dtype) for bsz, t, r, h, d in shapes]
            fn = lambda ps: fm.tpa_materialize_many(ps)
            if compiled:
                fn = torch.compile(fn, fullgraph=True)
            outs = fn(pairs)
            g = torch.autograd.grad(outs, [t for p in pairs for t in p], grads)
            for i, (a, b) in enumerate(pairs):
                a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
                o64 = ref(a64, b64)
                ga, gb = torch.autograd.grad(o64, (a64, b64), grads[i].double())
                o_same = ref(a.detach(), b.detach())
                for name, x, y, y_same in (("out", outs[i], o64, o_same), ("ga", g[2 * i], ga, None), ("gb", g[2 * i + 1], gb, None)):
                    err = (x.double() - y).abs().max().item()
                    tol = (2 * (y_same.double() - y).abs().max().item() if y_same is not None else 0) + (2e-2 if dtype == torch.bfloat16 else 1e-4) * y.abs().max().item()
                    good = err <= tol and not torch.isnan(x).any()
                    ok &= good
                    if not good:
                        print("FAIL", reg, dtype, compiled, i, name, err, tol)
            print(f"{reg:10s} {str(dtype):15s} compiled={compiled}: done")
print("gpu check", "PASS" if ok else "FAIL")
# inductor emits the triton_op's kernels into its own code (no call of the op at run time)
from torch._inductor.utils import run_and_get_code
fm._REGISTRATION = "auto"
torch._dynamo.reset()
a = torch.randn(4, 64, 2, 34, device=dev, dtype=torch.bfloat16)
b = torch.randn(4, 64, 2, 64, device=dev, dtype=torch.bfloat16)
_, codes = run_and_get_code(torch.compile(lambda x, y: fm.tpa_materialize_many([(x, y)])[0] * 2), a, b)
code = "\n".join(codes)
print("inductor code launches _materialize_fwd_kernel:", "_materialize_fwd_kernel" in code,
      "; calls the op:", "tpa.materialize" in code)
