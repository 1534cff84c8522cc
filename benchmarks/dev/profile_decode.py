"""Time and profile cached decoding of the T6 model on CUDA: direct forward steps and generate().

Usage: python benchmarks/dev/profile_decode.py [--types tpa mha] [--context 4096] [--batch 1]
"""

import argparse
import time

import torch

from tpa import T6Cache, T6Config, T6ForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--types", nargs="+", default=["tpa", "mha", "gqa", "mla"])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    for t in args.types:
        model = T6ForCausalLM(T6Config.from_preset("small", t, max_position_embeddings=args.context + 4096)).to(dev, torch.bfloat16).eval()
        for bsz in args.batch:
            ids = torch.randint(0, 50000, (bsz, args.context), device=dev)
            with torch.no_grad():
                for _ in range(2):  # warm-up round, then the measured one
                    cache = T6Cache.for_model(model, bsz, capacity=args.context + 2 * args.steps + 8)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for piece in ids.split(1024, dim=1):
                        model(piece, cache=cache, use_cache=True, logits_to_keep=1)
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    tok = ids[:, -1:]
                    for _ in range(args.steps):
                        out = model(tok, cache=cache, use_cache=True)
                        tok = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                gen_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps,
                                         min_new_tokens=args.steps, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                t3 = time.perf_counter()
                gen_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps,
                                         min_new_tokens=args.steps, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                t4 = time.perf_counter()
            print(f"{t:5s} B={bsz} ctx={args.context}: prefill {bsz * args.context / (t1 - t0):,.0f} tok/s, "
                  f"forward decode step {1e3 * (t2 - t1) / args.steps:.2f} ms, "
                  f"generate (prefill + {args.steps} steps) {t4 - t3:.3f} s", flush=True)
            if args.profile and bsz == args.batch[0]:
                from torch.profiler import ProfilerActivity, profile

                with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        out = model(tok, cache=cache, use_cache=True)
                        tok = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
