"""``tpa convert official``: a checkpoint of the paper's code (github tensorgi/T6) -> a T6 directory.

The paper's training script saves ``config.json`` and ``pytorch_model.bin`` for six model files
(``T6.py``, ``T6_kvonly.py``, ``llama-mha.py``, ``llama-gqa.py`` as GQA and as MQA,
``llama-mla.py``). :func:`convert_official` recognises which (:mod:`tpa.convert.official_spec`), maps
every tensor (:mod:`tpa.convert.official_map`), checks on a fixed random batch that our forward on
the mapped weights matches the official forward on the source weights
(:mod:`tpa.convert.official_reference`) in float32, and only then writes the directory: safetensors
weights, our config, the tokenizer if one is given, and ``conversion.json`` (what was converted and
the measured difference). Nothing is written when any step fails.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_TOLERANCE = 1e-4  # max |ours - official| / max |official| of the float32 logits


@dataclass
class OfficialConversion:
    """What :func:`convert_official` did: the official kind, our attention type, the measured relative
    difference of the logits (float32) and the written directory."""

    kind: str
    attention_type: str
    relative_error: float
    tolerance: float
    source: str
    out: str


def convert_official(src: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                     overwrite: bool = False, tolerance: float = DEFAULT_TOLERANCE,
                     verify_batch: int = 2, verify_tokens: int = 16) -> OfficialConversion:
    """Convert the official checkpoint directory ``src`` into a T6 directory ``out``.

    Args:
        src: a directory with the official ``config.json`` and ``pytorch_model.bin`` (read with
            ``torch.load(weights_only=True)``) or ``model.safetensors``.
        out: the directory to write (refused when it exists and is not empty, unless ``overwrite``).
        tokenizer: a local tokenizer directory (``AutoTokenizer``) to save beside the model.
        tolerance: the largest accepted relative difference of the verification logits.
        verify_batch, verify_tokens: size of the fixed random verification batch (tokens capped at
            the model's ``block_size``).

    Returns:
        an :class:`OfficialConversion`.

    Raises:
        tpa.convert.common.ConversionError: unknown model, missing/extra/misshapen tensors, an unsafe
            or unreadable weight file, a failed verification, a tokenizer that does not fit.
    """
    import torch

    from tpa.convert.common import ConversionError, check_state_dict, load_weights, publish_directory, \
        read_json, relative_error, strip_prefixes
    from tpa.convert.official_map import map_weights, t6_config
    from tpa.convert.official_reference import official_forward
    from tpa.convert.official_spec import expected_shapes, read_spec
    from tpa.models.t6.modeling_t6 import T6ForCausalLM

    src = Path(src)
    config = read_json(src / "config.json")
    weights = strip_prefixes(load_weights(src))
    spec = read_spec(config, weights)
    tied_names = {"transformer.wte.weight", "lm_head.weight"}
    check_state_dict(weights, expected_shapes(spec), optional=frozenset(tied_names), what=f"{spec.kind} checkpoint")
    if not tied_names & set(weights):
        raise ConversionError("the checkpoint has neither transformer.wte.weight nor lm_head.weight")
    dtypes = {t.dtype for t in weights.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ConversionError(f"expected floating-point tensors of one dtype, got {sorted(map(str, dtypes))}")
    source_dtype = dtypes.pop()
    weights = {k: v.to(torch.float32) for k, v in weights.items()}
    tied = not tied_names <= set(weights) or torch.equal(weights["transformer.wte.weight"], weights["lm_head.weight"])

    model = T6ForCausalLM(t6_config(spec, tied)).eval()
    try:
        model.load_state_dict(map_weights(spec, weights, model), strict=True)
    except RuntimeError as err:  # a mapping that does not fit our model is a bug, say so plainly
        raise ConversionError(f"mapped tensors do not fit T6ForCausalLM: {err}") from None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (verify_batch, min(verify_tokens, spec.block_size)), generator=generator)
    with torch.no_grad():
        error = relative_error(model(ids).logits, official_forward(spec, weights, ids))
    if not error <= tolerance:
        raise ConversionError(f"verification failed: our logits differ from the official forward's by {error:.3g} "
                              f"relative (float32), more than the tolerance {tolerance:g}; nothing written")
    tok = _load_tokenizer(tokenizer, model.config) if tokenizer is not None else None

    result = OfficialConversion(spec.kind, spec.attention_type, error, tolerance, str(src), str(out))
    model.to(source_dtype)
    with publish_directory(out, overwrite=overwrite) as staging:
        _save(model, tok, staging, result, spec)
        reloaded = T6ForCausalLM.from_pretrained(staging, dtype=source_dtype).state_dict()
        if any(not torch.equal(reloaded[k], v) for k, v in model.state_dict().items()):
            raise ConversionError("the written weights do not read back equal to the converted ones; nothing written")
    return result


def _load_tokenizer(path, config):
    from transformers import AutoTokenizer

    from tpa.convert.common import ConversionError
    from tpa.models.t6.loading import check_tokenizer_fits

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot load a tokenizer from {path}: {err}") from None
    try:
        check_tokenizer_fits(config, tok)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return tok


def _save(model, tok, directory: Path, result: OfficialConversion, spec) -> None:
    import json

    from tpa.models.t6.loading import save_model_and_tokenizer

    if tok is not None:
        save_model_and_tokenizer(model, tok, directory)
    else:
        model.save_pretrained(directory)
    record = {k: v for k, v in asdict(result).items() if k != "out"} | {"official": asdict(spec)}
    (directory / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")


def _run(args) -> int:
    from tpa.convert.common import ConversionError

    try:
        result = convert_official(args.src, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite,
                                  tolerance=args.tolerance)
    except ConversionError as err:
        print(f"tpa convert official: {err}", file=sys.stderr)
        return 1
    print(f"converted {result.kind} ({result.attention_type}) from {result.source} to {result.out}: logits match the "
          f"official forward to {result.relative_error:.2e} relative (float32, tolerance {result.tolerance:g})")
    return 0
