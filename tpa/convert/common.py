"""What every converter shares: reading weights safely, checking a state dict, publishing a directory atomically.

A converter reads a source checkpoint with :func:`load_weights` (safetensors, or a ``torch.load``
with ``weights_only=True``: never an arbitrary unpickle), checks the tensors it found against the
ones it expects with :func:`check_state_dict`, and writes its result through
:func:`publish_directory`, which builds the directory beside its destination and renames it into
place only when the writer returned without an error: a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted: the message says what was expected."""


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; :class:`ConversionError` when missing or not an object."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def load_weights(directory: str | os.PathLike, names=("model.safetensors", "pytorch_model.bin")) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint directory: the first of ``names`` that exists, or its shards.

    ``*.safetensors`` files are read with safetensors; anything else with ``torch.load(...,
    weights_only=True)``, which refuses pickles holding anything but tensors and plain containers.
    A checkpoint that ``save_pretrained`` split into shards is read through its ``NAME.index.json``.

    Raises:
        ConversionError: no weight file, a file that is not a plain ``{name: tensor}`` dict, or one
            that the safe loaders refuse; an index naming files outside the directory.
    """
    directory = Path(directory)
    for name in names:
        if (directory / name).is_file():
            return _load_weight_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index} has no weight_map of tensor name -> shard file")
            weights: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or shard in (".", ".."):
                    raise ConversionError(f"{index} names a shard outside the directory: {shard!r}")
                weights.update(_load_weight_file(directory / shard))
            return weights
    raise ConversionError(f"no weights in {directory}: expected one of {', '.join(names)} (or its .index.json)")


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path} not found")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights = load_file(str(path), device="cpu")
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the loaders raise many types; all mean "not a loadable weight file"
        raise ConversionError(
            f"{path} could not be read as a plain state dict of tensors "
            f"(only safetensors or a weights_only torch.load are accepted): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise ConversionError(f"{path} must hold a flat {{name: tensor}} state dict, got {type(weights).__name__} "
                              "with other contents")
    return dict(weights)


def strip_prefixes(weights: dict[str, torch.Tensor], prefixes=("_orig_mod.", "module.")) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes that torch.compile (``_orig_mod.``) and DDP (``module.``) put on every key."""
    out = {}
    for key, value in weights.items():
        for prefix in prefixes:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def check_state_dict(weights: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                     optional: frozenset[str] = frozenset(), what: str = "checkpoint") -> None:
    """Every expected tensor present with its shape, nothing else.

    Args:
        weights: the tensors found.
        expected: name -> shape of every tensor the converter maps.
        optional: names among ``expected`` that may be absent (e.g. one of two tied weights).
        what: how the error messages name the source.

    Raises:
        ConversionError: missing, unexpected or misshapen tensors, all listed (first 10 of each).
    """
    problems = []
    missing = sorted(set(expected) - set(weights) - set(optional))
    extra = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_some(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_some(extra)}")
    wrong = [f"{name} has shape {tuple(weights[name].shape)}, expected {tuple(shape)}"
             for name, shape in expected.items() if name in weights and tuple(weights[name].shape) != tuple(shape)]
    if wrong:
        problems.append("; ".join(wrong[:10]) + (f" (and {len(wrong) - 10} more)" if len(wrong) > 10 else ""))
    if problems:
        raise ConversionError(f"the {what} does not fit: " + ". ".join(problems))


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:10])
    return shown + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)).item()


@contextlib.contextmanager
def publish_directory(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without an error, it becomes ``destination``.

    The staging directory sits beside ``destination`` (same file system), so publishing is one rename;
    on an error it is removed and ``destination`` is untouched. An existing non-empty ``destination``
    is refused unless ``overwrite``, in which case it is replaced (moved aside, then deleted) only after
    the new directory is complete.

    Raises:
        ConversionError: ``destination`` exists (non-empty, without ``overwrite``) or is a file.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ConversionError(f"{destination} exists and is not a directory")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise ConversionError(f"{destination} exists and is not empty (pass overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, old / "dir")
            os.replace(staging, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
