"""Training checkpoints: model, optimiser state, RNG states and data position, written atomically.

Layout of ``RUN/checkpoints/step-000100/``: the model as ``save_pretrained`` writes it (``config.json``,
``model.safetensors``, the tokenizer), ``optimizer.safetensors`` (every tensor of the optimiser state),
``trainer_tensors.safetensors`` (RNG states) and ``trainer_state.json`` (the rest as JSON: the step, the
optimiser state's structure, the run's settings).
A checkpoint is built in a hidden staging folder and renamed into place once complete, and
``RUN/checkpoints/latest`` is replaced atomically afterwards: a crash or a full disk mid-save leaves the
previous checkpoint intact. A process killed mid-save cannot remove its staging folder; the next start of the
run does (:func:`remove_stale_staging`). No pickle anywhere.

Every file is checksummed (:mod:`engram.storage.checksums`): the safetensors files carry a CRC-32 per chunk of
their data, ``checksums.json`` covers the JSON files and the tokenizer, and loading refuses a corrupt file,
naming it and the byte range. Checkpoints written before checksums existed load unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from engram.atomic import atomic_write_text
from engram.model.serialization import CONFIG_NAME
from engram.storage.checksums import load_safetensors, record_checksums, verify_recorded, write_safetensors

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TRAINER_TENSORS_FILE = "trainer_tensors.safetensors"
LATEST_FILE = "latest"
FINAL_FOLDER = "final"
CHECKPOINT_FORMAT = 1
_STAGING_PREFIX = ".tmp-step-"
_SHARED = "shared"
_LISTED_CANDIDATES = 8  # model folders a "not a model folder" error lists
_WHAT_TO_PASS = "pass a run folder, its final/ or one of its checkpoints/step-N"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested state (dicts, lists, tuples) by a reference; collect the tensors.

    Dict keys keep their type (optimiser states are keyed by int), so the JSON form stores pairs.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, prefix), flatten_state(v, tensors, prefix)]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_folder(run_dir: str | os.PathLike[str], step: int, shared: bool = False) -> Path:
    """The hidden folder checkpoint ``step`` is built in (``shared``: the same name in every process of a run,
    whose ranks all write into it)."""
    suffix = _SHARED if shared else str(os.getpid())
    return Path(run_dir) / "checkpoints" / f"{_STAGING_PREFIX}{step:06d}-{suffix}"


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def remove_stale_staging(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders that saves killed midway left in ``RUN/checkpoints`` (each a model and its
    optimiser state); returns them. Call it as the run starts, before it saves: every folder of a distributed
    run's saves goes (``shared``: no process owns it), and each process's own one whose process is gone. That of
    a live process is kept, as it may be saving now."""
    removed = []
    for folder in sorted((Path(run_dir) / "checkpoints").glob(f"{_STAGING_PREFIX}*")):
        owner = folder.name.rsplit("-", 1)[-1]
        if owner == _SHARED or (owner.isdigit() and not _process_alive(int(owner))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def save_checkpoint(run_dir: str | os.PathLike[str], step: int, model: Any, optimizer_state: dict[str, Any],
                    trainer_state: dict[str, Any], keep: int = 2, staging: Path | None = None,
                    table_parts: dict[int, list[list[Any]]] | None = None) -> Path:
    """Write checkpoint ``step`` of a run; keep the newest ``keep`` checkpoints. Returns its folder.

    ``staging``: a :func:`staging_folder` other ranks have already written their table parts into (listed in
    ``table_parts``, see :func:`engram.parallel.checkpoint.write_table_shards`); it becomes the checkpoint.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = staging if staging is not None else staging_folder(run_dir, step)
    if staging is None and tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, table_parts=table_parts)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten_state(optimizer_state, tensors)
        write_safetensors(tmp / OPTIMIZER_FILE, tensors)
        state = {"format": CHECKPOINT_FORMAT, "step": step, "optimizer": skeleton,
                 "trainer": flatten_state(trainer_state, tensors, prefix="s")}
        extra = {k: v for k, v in tensors.items() if k.startswith("s")}
        write_safetensors(tmp / TRAINER_TENSORS_FILE, extra)
        (tmp / STATE_FILE).write_text(json.dumps(state))
        record_checksums(tmp, [STATE_FILE])
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST_FILE, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The folder ``RUN/checkpoints/latest`` names, or None when the run has no checkpoint."""
    pointer = Path(run_dir) / "checkpoints" / LATEST_FILE
    return _pointed_checkpoint(pointer) if pointer.is_file() else None


def _pointed_checkpoint(pointer: Path) -> Path:
    """The checkpoint folder the ``latest`` file ``pointer`` names."""
    folder = pointer.parent / pointer.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing or incomplete")
    return folder


def load_checkpoint(folder: str | os.PathLike[str]) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, optimizer_state, trainer_state)`` of a checkpoint folder (load the model with from_pretrained)."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    verify_recorded(folder, [STATE_FILE])
    state = json.loads(state_path.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_path}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    tensors = load_safetensors(folder / OPTIMIZER_FILE)
    tensors.update(load_safetensors(folder / TRAINER_TENSORS_FILE))
    return state["step"], unflatten_state(state["optimizer"], tensors), unflatten_state(state["trainer"], tensors)


def _model_folders_in(path: Path) -> list[Path]:
    """The model folders just inside ``path``: its subfolders (and their ``final/``) and checkpoints, then the
    ``checkpoints/latest`` pointer."""
    patterns = (f"*/{CONFIG_NAME}", f"*/{FINAL_FOLDER}/{CONFIG_NAME}", f"checkpoints/step-*/{CONFIG_NAME}")
    found = sorted({config.parent for pattern in patterns for config in path.glob(pattern)})
    pointer = path / "checkpoints" / LATEST_FILE
    return found + [pointer] if pointer.is_file() else found


def _not_a_model_folder(path: Path) -> str:
    """Why ``path`` names no model folder, and what to pass instead."""
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        if (path.parent / CONFIG_NAME).is_file():
            return f"it is a file; pass the folder that holds it: {path.parent}"
        return f"it is a file ({_WHAT_TO_PASS})"
    reason = f"no {CONFIG_NAME} in it or in its {FINAL_FOLDER}/"
    candidates = _model_folders_in(path)
    if not candidates:
        return f"{reason} ({_WHAT_TO_PASS})"
    unfinished = " (an unfinished run?)" if (path / "checkpoints").is_dir() else ""
    listed = ", ".join(str(folder) for folder in candidates[:_LISTED_CANDIDATES])
    more = f" and {len(candidates) - _LISTED_CANDIDATES} more" if len(candidates) > _LISTED_CANDIDATES else ""
    return f"{reason}{unfinished}; pass one of: {listed}{more}"


def checkpoint_folder(checkpoint: str | os.PathLike[str]) -> Path:
    """The ``save_pretrained`` folder a ``--checkpoint`` names: a model folder itself (a run's ``final/``, one of
    its ``checkpoints/step-N``), a run folder (its ``final/``), or a run's ``checkpoints/`` folder or its
    ``checkpoints/latest`` pointer (the checkpoint that names). Anything else is refused with a ``ValueError``
    saying why and listing the model folders inside it."""
    path = Path(checkpoint)
    pointer = path if path.name == LATEST_FILE else path / LATEST_FILE
    if pointer.is_file():
        path = _pointed_checkpoint(pointer)
    for folder in (path, path / FINAL_FOLDER):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise ValueError(f"checkpoint {str(checkpoint)!r} is not a model folder: {_not_a_model_folder(path)}")
