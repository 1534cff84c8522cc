"""GPU sanity run of the T6 model: cached generation equals uncached generation for every attention
type, the FlashTPA kernel path equals the reference path, save/load round trip on the GPU.

Usage: python scripts/gpu_model_check.py  (needs CUDA; prints one line per check, exits 1 on failure)
"""

import sys
import tempfile

import torch

import tpa
from tpa import T6Config, T6ForCausalLM


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    dev, failures = "cuda", 0
    torch.manual_seed(0)
    prompts = torch.randint(1, 500, (3, 33), device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        for t in tpa.ATTENTION_TYPES:
            cfg = T6Config.from_preset("tiny", t, vocab_size=512, initializer_range=0.1, decode_impl="reference")
            model = T6ForCausalLM(cfg).to(dev, dtype).eval()
            kw = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
            a = model.generate(prompts, **kw)
            b = model.generate(prompts, use_cache=False, **kw)
            err = max((x.float() - y.float()).abs().max().item() for x, y in zip(a.scores, b.scores))
            same = torch.equal(a.sequences, b.sequences)
            line = f"{str(dtype):15s} {t:11s} cache==nocache tokens={same} max|dscore|={err:.2e}"
            if t in ("tpa", "tpa_kvonly"):
                model.config.decode_impl = "auto"
                c = model.generate(prompts, **kw)
                kerr = max((x.float() - y.float()).abs().max().item() for x, y in zip(a.scores, c.scores))
                line += f" kernel==reference tokens={torch.equal(a.sequences, c.sequences)} max|dscore|={kerr:.2e}"
                if dtype == torch.float32 and (kerr > 1e-3 or not torch.equal(a.sequences, c.sequences)):
                    failures += 1
            if dtype == torch.float32 and (not same or err > 1e-3):
                failures += 1
            print(line, flush=True)
    model = T6ForCausalLM(T6Config.from_preset("tiny", "tpa", vocab_size=512)).to(dev, torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = T6ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(dev)
        ok = all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    print(f"save/load bf16 on cuda bitwise={ok}")
    failures += not ok
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
