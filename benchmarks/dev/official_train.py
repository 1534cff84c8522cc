"""Time the paper's official T6 and LLaMA-MHA models (tensorgi/T6) under `tpa bench train`'s
whole-model-compile loop, so that their figures sit beside ours from the same loop on the same GPU.

The official code is not part of this repository: point ``--official-dir`` at a checkout of
https://github.com/tensorgi/T6 (its ``model/T6.py`` and ``model/llama-mha.py`` are imported from
there, unchanged). Each model is wrapped so that ``model(input_ids=..., labels=...).loss`` is the
official ``forward(idx, targets)``'s loss; the loop (``tpa.bench.train.model_compile_loop``:
``torch.compile(model)``, bf16 autocast, fused AdamW, grad-norm clipping) and the FLOP count are ours.
Sizes: the official ``small`` configs (12 layers, d_model 768, d_h 64; T6 34 heads, R=(6,2,2); MHA 12
heads), vocabulary 50,304.

    python benchmarks/dev/official_train.py --official-dir .official/T6 --micro-batch 16 --seq-len 1024 \
        --steps 20 --warmup 5 --out $OUT/official
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from tpa.bench.train import model_compile_loop
from tpa.utils.files import atomic_write_text

MODELS = {  # name: (file under model/, GPTConfig overrides)
    "official-t6": ("T6.py", {"n_head": 34, "rank": 2, "q_rank": 6}),
    "official-mha": ("llama-mha.py", {"n_head": 12}),
}


class OfficialCausalLM(nn.Module):
    """The official ``GPT`` behind the call signature of a transformers causal LM (loss only)."""

    def __init__(self, gpt: nn.Module, n_head: int, head_dim: int):
        super().__init__()
        self.gpt = gpt
        c = gpt.config
        self.config = SimpleNamespace(vocab_size=c.vocab_size, num_hidden_layers=c.n_layer,
                                      num_attention_heads=n_head, head_dim=head_dim, tie_word_embeddings=True)

    def forward(self, input_ids, labels, use_cache=False):
        _, loss = self.gpt(input_ids, targets=labels, return_logits=False)
        return CausalLMOutput(loss=loss)


def _load(official_dir: Path, name: str, seq_len: int) -> OfficialCausalLM:
    filename, overrides = MODELS[name]
    path = official_dir / "model" / filename
    if not path.is_file():
        raise SystemExit(f"{path} not found: --official-dir must be a checkout of tensorgi/T6")
    spec = importlib.util.spec_from_file_location(f"tpa_bench_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dynamo looks the module up by name
    spec.loader.exec_module(module)
    fields = dict(vocab_size=50304, n_layer=12, n_embd=768, head_dim=64, block_size=seq_len, bias=False,
                  dropout=0.0, **overrides)
    config = module.GPTConfig(**fields)
    for key, value in fields.items():  # the dataclass fields are class attributes: set them on the instance
        setattr(config, key, value)
    torch.manual_seed(0)
    return OfficialCausalLM(module.GPT(config), n_head=fields["n_head"], head_dim=fields["head_dim"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager checks the loop without codegen")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/official_train")))
    parser.add_argument("--profile", action="store_true",
                        help="3 more steps under torch.profiler after the timed ones: OUT/profile_official_NAME.txt")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model = _load(args.official_dir, name, args.seq_len)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        measured = model_compile_loop(model, micro=args.micro_batch, seq_len=args.seq_len, steps=args.steps,
                                      warmup=args.warmup, device=device, bf16=device.type == "cuda",
                                      backend=args.compile_backend,
                                      profile_path=args.out / f"profile_official_{name}.txt" if args.profile else None)
        rows.append({"model": name, **measured})
        print(f"{name}: {measured['tokens_per_s']:,.0f} tokens/s, mfu {measured['mfu']}, "
              f"peak {measured['peak_memory_gb']:.1f} GB, {measured['parameters']:,} parameters", flush=True)
        del model
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "official_train.json", json.dumps(
        {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__, "argv": sys.argv[1:],
         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
