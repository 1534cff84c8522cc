"""Checkpoints that hold everything an exact resume needs, written atomically, verified on load.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_00001000/``::

    state/                     model and optimizer through torch.distributed.checkpoint (DCP): every
                               rank writes its own shards (FSDP2) or the deduplicated replicas (DDP,
                               one process); DCP checkpoints load under any other world size or parallelism
    rng/rank_00000.safetensors the RNG states of each rank (torch CPU and CUDA, numpy, python)
    trainer.json               step, tokens seen, scheduler state, data position, configs, world size
    manifest.json              size and SHA-256 of every other file, written last

Nothing is unpickled on load: the tensors are raw DCP storage or safetensors, the rest is JSON, and
DCP's own ``.metadata`` (a pickle) goes through an unpickler that builds only DCP's metadata
classes, ``torch.Size``, dtypes and paths.

A checkpoint is written into ``.step_00001000.tmp``, every file and folder is fsynced, and the folder
is renamed into place once every rank has finished (then the parent folder is fsynced), so a
``step_*`` folder is always complete; a write killed half-way leaves only a ``.tmp`` folder that the
next save deletes and that :func:`list_checkpoints` never returns. The newest ``keep`` checkpoints
are kept; older ones are first renamed to ``.step_*.old`` (atomic) and then deleted, so a kill
during the deletion leaves only a hidden folder that the next run deletes. :func:`find_resumable`
verifies the manifest and falls back to the newest checkpoint that verifies, moving a corrupt one
aside to ``step_*.corrupt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_NAME = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"
LEGACY_TRAINER_FILE = "trainer.pt"  # checkpoints written before manifests (loaded with weights_only=True)


class CorruptCheckpoint(ValueError):
    """A checkpoint's files do not match its manifest, or cannot be read."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); nothing was published or rotated."""


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        if not _is_dist():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() or (path / LEGACY_TRAINER_FILE).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints (with a manifest, or an older-format trainer.pt), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def remove_stale(ckpt_dir: Path) -> list[Path]:
    """Delete what only a killed save or rotation leaves: ``.step_*.tmp`` and ``.step_*.old`` folders,
    and ``step_*`` folders with neither manifest nor trainer state (a deletion cut short). Only call it
    while holding the run directory's lock (:mod:`tpa.train.runlock`). Returns what was deleted."""
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for p in sorted(ckpt_dir.iterdir()):
        stale_hidden = p.name.startswith(".step_") and (p.name.endswith(".tmp") or p.name.endswith(".old"))
        half_deleted = _NAME.match(p.name) and p.is_dir() and not _is_complete(p) \
            and not (p / TRAINER_FILE).is_file()
        if stale_hidden or half_deleted:
            _delete(p)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------------
# RNG states as safetensors (tensors) with the non-tensor parts as string metadata


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states: (tensors, string metadata) for safetensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).copy()),
               "python_state": torch.tensor(py_state, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
            "python": json.dumps([version, gauss_next])}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    version, gauss_next = json.loads(meta["python"])
    torch.set_rng_state(tensors["torch"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy(), int(pos), int(has_gauss), float(cached)))
    random.setstate((version, tuple(tensors["python_state"].tolist()), gauss_next))
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --------------------------------------------------------------------------------------------------
# Writing


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (children before parents), so the rename publishes data on disk."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(root: Path) -> None:
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": _sha256(root / rel)} for rel in _files(root)}
    (root / MANIFEST_FILE).write_text(json.dumps({"format": "tpa-checkpoint", "version": 1, "files": files},
                                                 indent=1) + "\n")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n")


def _before_publish(tmp: Path) -> None:
    """Everything is written; the rename comes next. (A seam where tests kill the process.)"""


def _plain_layout(model, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
    """The state dicts with a tensor-parallel model's fused projections in the single-process layout
    (:func:`tpa.parallel.to_plain`), so that checkpoints move between TP sizes and one process."""
    from tpa.parallel import to_plain

    return to_plain(model, model_sd, optim_sd)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    """Write a checkpoint collectively (every rank calls this) and return its final path.

    ``trainer_state`` must be JSON (numbers, strings, lists, dicts, None)."""
    from safetensors.torch import save_file

    rank = _rank()
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".{checkpoint_name(step)}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = _plain_layout(model, *get_state_dict(model, optimizer))
    try:
        try:
            with _quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
        except CheckpointException as err:  # DCP wraps each rank's error (a BaseException): take the first
            first = next(iter(err.failures.values()))[0]
            raise first if isinstance(first, Exception) else RuntimeError(str(err)) from None
        tensors, meta = rng_state()
        save_file(tensors, str(tmp / "rng" / f"rank_{rank:05d}.safetensors"), metadata=meta)
        _barrier()
        if rank == 0:
            _write_json(tmp / TRAINER_FILE, trainer_state)
            write_manifest(tmp)
            _fsync_tree(tmp)
    except Exception as err:
        free_mb = shutil.disk_usage(ckpt_dir).free / 2**20
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointWriteError(
            f"could not write checkpoint {final.name} in {ckpt_dir} ({type(err).__name__}: {reason}); the disk has "
            f"{free_mb:.0f} MB free. The earlier checkpoints are untouched: make room and continue with --resume"
        ) from err
    if rank == 0:
        _before_publish(tmp)
        if final.exists():  # the same step saved again (e.g. halted right after a periodic save)
            _retire(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            _retire(old)
    _barrier()
    return final


def _retire(path: Path) -> None:
    """Delete a checkpoint: rename it hidden first (atomic), so a kill mid-deletion leaves no ``step_*``."""
    hidden = path.with_name(f".{path.name}.old")
    if hidden.exists() or hidden.is_symlink():
        _delete(hidden)
    os.rename(path, hidden)
    _delete(hidden)


def _delete(path: Path) -> None:
    """Delete a folder, or only the link when it is a symbolic link to one (a checkpoint linked in)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Verifying and reading


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CorruptCheckpoint` unless every file matches the manifest (size and SHA-256) and
    no file is missing or extra. An older-format checkpoint (no manifest) passes unverified."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        if (path / LEGACY_TRAINER_FILE).is_file():
            return
        raise CorruptCheckpoint(f"{path}: no {MANIFEST_FILE}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpoint(f"{manifest_path}: unreadable manifest ({err})") from None
    present = set(_files(path))
    if present - set(files):
        raise CorruptCheckpoint(f"{path}: files not in the manifest: {sorted(present - set(files))[:5]}")
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            raise CorruptCheckpoint(f"{file} is missing")
        if file.stat().st_size != want["size"]:
            raise CorruptCheckpoint(f"{file} has {file.stat().st_size} bytes, the manifest says {want['size']}")
        if _sha256(file) != want["sha256"]:
            raise CorruptCheckpoint(f"{file} does not match its SHA-256 in the manifest")


def find_resumable(ckpt_dir: Path, say=None) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are renamed ``step_*.corrupt`` (and said).
    None when there is no checkpoint; :class:`CorruptCheckpoint` when there are some and none verifies.

    Rank 0 verifies and tells the other ranks; every rank calls this."""
    say = say or (lambda message: print(message, file=sys.stderr))
    chosen, corrupt = None, []
    if _rank() == 0:
        for _, path in reversed(list_checkpoints(ckpt_dir)):
            try:
                verify_checkpoint(path)
                read_trainer_state(path)
            except CorruptCheckpoint as err:
                aside = path.with_name(path.name + ".corrupt")
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(path, aside)
                say(f"warning: checkpoint {path.name} is corrupt ({err}); moved it to {aside.name}")
                corrupt.append(aside.name)
                continue
            chosen = path
            break
        if corrupt and chosen is not None:
            say(f"resuming from {chosen.name}, the newest checkpoint that verifies")
    error = None
    if chosen is None and corrupt:
        error = (f"no checkpoint in {ckpt_dir} verifies ({', '.join(corrupt)} are corrupt); "
                 "delete them and start again without --resume")
    if _is_dist():
        box = [str(chosen) if chosen else None, error]
        dist.broadcast_object_list(box, src=0)
        chosen, error = (Path(box[0]) if box[0] else None), box[1]
    if error:
        raise CorruptCheckpoint(error)
    return chosen


def read_trainer_state(path: Path) -> dict:
    """Step, tokens, scheduler and data state, configs and world size of a checkpoint."""
    file = path / TRAINER_FILE
    try:
        if file.is_file():
            return json.loads(file.read_text())
        legacy = path / LEGACY_TRAINER_FILE
        if legacy.is_file():
            return torch.load(legacy, weights_only=True)
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise CorruptCheckpoint(f"{file if file.is_file() else path / LEGACY_TRAINER_FILE}: cannot read it "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    raise CorruptCheckpoint(f"{path}: no {TRAINER_FILE}")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (dataclasses of shapes, dtypes, offsets) and nothing else."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                                  "_MEM_FORMAT_ENCODING", "ChunkStorageMetadata",
                                                  "BytesStorageMetadata", "MetadataIndex", "StorageMeta"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module, name):
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's DCP metadata")


def _safe_reader(path: Path):
    """DCP's file-system reader whose metadata is read (first, here) by :class:`_MetadataUnpickler`
    instead of pickle; a refused or unreadable metadata file raises :class:`CorruptCheckpoint`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError, TypeError) as err:
        raise CorruptCheckpoint(f"{file}: {err}") from None

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _load_rng(path: Path, rank: int, world_size: int) -> None:
    from safetensors import safe_open

    file = path / "rng" / f"rank_{rank:05d}.safetensors"
    if file.is_file():
        with safe_open(str(file), framework="pt") as f:
            set_rng_state({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
        return
    legacy = path / "rng" / f"rank_{rank:05d}.pt"
    if legacy.is_file():
        numpy_core = getattr(np, "_core", None) or np.core
        try:
            with torch.serialization.safe_globals([numpy_core.multiarray._reconstruct, np.ndarray, np.dtype,
                                                   np.dtypes.UInt32DType]):
                state = torch.load(legacy, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise CorruptCheckpoint(f"{legacy}: cannot read it ({str(err).splitlines()[0]})") from None
        set_rng_state({"torch": state["torch"], "numpy_keys": torch.from_numpy(state["numpy"][1].copy()),
                       "python_state": torch.tensor(state["python"][1]), **({"cuda": state["cuda"]}
                                                                            if "cuda" in state else {})},
                      {"numpy": json.dumps([state["numpy"][0], *map(float, state["numpy"][2:])]),
                       "python": json.dumps([state["python"][0], state["python"][2]])})
    elif rank < world_size:
        raise CorruptCheckpoint(f"{file} is missing from a checkpoint written by {world_size} ranks")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model, optimizer and this rank's RNG states in place; return the trainer state."""
    trainer_state = read_trainer_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_plain, optim_plain = _plain_layout(model, model_sd, optim_sd)
    state = {"model": model_plain, "optim": optim_plain}
    reader = _safe_reader(path / "state")
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader)
    if model_plain is not model_sd:
        from tpa.parallel import from_plain

        model_sd, optim_sd = from_plain(model, state["model"], state["optim"], model_sd, optim_sd)
    else:
        model_sd, optim_sd = state["model"], state["optim"]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    _load_rng(path, _rank(), trainer_state.get("world_size", 1))
    return trainer_state
