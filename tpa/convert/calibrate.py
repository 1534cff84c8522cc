"""Calibration tokens for a conversion, the attention inputs they give, and the errors a conversion makes.

Calibration sequences come from a ``tpa data prepare`` folder (its train split, contiguous windows
from the start) or, without one, from uniform random token ids. The first three quarters of the
sequences fit the factors; the rest are held out and every reported error is measured on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tpa.convert.common import ConversionError


def calibration_sequences(data_dir: str | None, vocab_size: int, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[S, seq_len]`` token ids (at least 2 sequences: one to fit, one held out)."""
    count = max(2, tokens // seq_len)
    if data_dir is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (count, seq_len), generator=gen)
    from tpa.data.loader import TokenShards
    from tpa.data.prepare import read_meta

    try:
        meta = read_meta(data_dir)
        shards = TokenShards(data_dir, "train")
    except (OSError, ValueError) as err:
        raise ConversionError(f"--calibration {data_dir}: not a `tpa data prepare` folder ({err})") from None
    if int(meta["vocab_size"]) > vocab_size:
        raise ConversionError(f"--calibration {data_dir}: its tokenizer has {meta['vocab_size']} tokens, more than the "
                              f"model's vocabulary ({vocab_size}); tokenize the calibration text with the model's tokenizer")
    available = int(meta["splits"]["train"]["tokens"]) // seq_len
    if available < 2:
        raise ConversionError(f"--calibration {data_dir}: fewer than 2 sequences of {seq_len} tokens in its train split")
    count = min(count, available)
    rows = [torch.from_numpy(shards.read(i * seq_len, seq_len).astype("int64")) for i in range(count)]
    return torch.stack(rows)


def split_fit_held(sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_fit = min(len(sequences) - 1, max(1, (3 * len(sequences)) // 4))
    return sequences[:n_fit], sequences[n_fit:]


@torch.no_grad()
def attention_inputs(model, sequences: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    """Per layer, the (normalised) hidden states entering its attention: ``[S, T, C]`` float64."""
    inputs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, i=i: inputs[i].append(args[0].detach().double())) for i, layer in enumerate(model.model.layers)]
    try:
        for lo in range(0, len(sequences), batch):
            model(input_ids=sequences[lo:lo + batch], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in inputs]


@torch.no_grad()
def attention_output_error(source_attn, target_attn, x: torch.Tensor, rotary) -> float:
    """``||TPA(x) - source(x)|| / ||source(x)||`` for one layer on ``x [S, T, C]`` (both in float64)."""
    from tpa.layers import AttentionContext

    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cos, sin = rotary(positions, dtype=torch.float64)
    ctx = AttentionContext(cos=cos, sin=sin)
    src = torch.func.functional_call(source_attn, {k: v.double() for k, v in source_attn.state_dict().items()}, (x, ctx))
    out = torch.func.functional_call(target_attn, {k: v.double() for k, v in target_attn.state_dict().items()}, (x, ctx))
    return float((out - src).norm() / src.norm().clamp_min(1e-30))


@torch.no_grad()
def mean_loss(model, sequences: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy of ``model`` over ``sequences [S, T]``."""
    total, count = 0.0, 0
    for lo in range(0, len(sequences), batch):
        rows = sequences[lo:lo + batch]
        out = model(input_ids=rows, labels=rows, use_cache=False)
        total += out.loss.item() * len(rows)
        count += len(rows)
    return total / count


def max_logit_gap(model_a, model_b, ids: torch.Tensor) -> tuple[float, float]:
    """``(max |logits_a - logits_b|, max |logits_b|)`` on ``ids [B, T]``."""
    with torch.no_grad():
        a = model_a(input_ids=ids, use_cache=False).logits.double()
        b = model_b(input_ids=ids, use_cache=False).logits.double()
    return float((a - b).abs().max()), float(b.abs().max())


def check_same_logits(model_a, model_b, ids: torch.Tensor, what: str, rel_tol: float) -> float:
    """Raise :class:`ConversionError` unless ``max|Δlogits| <= rel_tol * max|logits|``; return the ratio."""
    gap, scale = max_logit_gap(model_a, model_b, ids)
    ratio = gap / max(scale, 1e-30)
    if not ratio <= rel_tol:
        raise ConversionError(f"verification failed: {what} differ by {gap:.3g} (max |logit| {scale:.3g}, relative "
                              f"{ratio:.3g} > {rel_tol:g}); nothing was written")
    return ratio


def copy_tokenizer(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    import shutil

    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
