"""Checks on quantized T6 models that turn a library's internal assertion into a clear error."""

from __future__ import annotations

import sys

from torch import nn

# bitsandbytes packs 4-bit weights for its CPU kernels in blocks of 32 output features
# (`_convert_weight_packed_for_cpu`: "N must be divisible by block_n") and reshapes the scales per
# block of `blocksize` (64 by default) input features
BNB_4BIT_CPU_BLOCK_N = 32


def _unpackable(module) -> bool:
    blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", None) or 64
    return module.out_features % BNB_4BIT_CPU_BLOCK_N != 0 or module.in_features % blocksize != 0


def check_quantized_layers(model: nn.Module) -> None:
    """Raise ValueError when ``model`` holds 4-bit bitsandbytes layers on the CPU whose shape
    bitsandbytes' CPU kernels cannot pack (output width a multiple of 32, input width a multiple of
    the quantization block, 64 by default; TPA's fused factor projection ``proj`` has width
    ``(R_q + R_k + R_v) * (H + D)``, e.g. 370), naming the layers and the way out (leave them
    unquantized)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return
    bad = sorted({".".join(name.split(".")[-2:]) for name, module in model.named_modules()
                  if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu"
                  and _unpackable(module)})
    if bad:
        raise ValueError(
            f"bitsandbytes' 4-bit CPU kernels need layer output widths divisible by {BNB_4BIT_CPU_BLOCK_N} and input "
            f"widths divisible by the quantization block (64); the T6 layers {bad} are not: load with "
            f"BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules={bad + ['lm_head']}) to keep them "
            "unquantized, or quantize on a GPU"
        )
