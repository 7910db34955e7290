"""Training checkpoints: model, optimiser state, RNG states and data position, written atomically.

Layout of ``RUN/checkpoints/step-000100/``: the model as ``save_pretrained`` writes it (``config.json``,
``model.safetensors``, the tokenizer), ``optimizer.safetensors`` (every tensor of the optimiser state),
``trainer_tensors.safetensors`` (RNG states) and ``trainer_state.json`` (the rest as JSON: the step, the
optimiser state's structure, the run's settings).
A checkpoint is built in a hidden temporary folder and renamed into place once complete, and
``RUN/checkpoints/latest`` is replaced atomically afterwards: a crash or a full disk mid-save leaves the
previous checkpoint intact. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engram.atomic import atomic_write_text

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TRAINER_TENSORS_FILE = "trainer_tensors.safetensors"
LATEST_FILE = "latest"
CHECKPOINT_FORMAT = 1


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
    suffix = "shared" if shared else str(os.getpid())
    return Path(run_dir) / "checkpoints" / f".tmp-step-{step:06d}-{suffix}"


def save_checkpoint(run_dir: str | os.PathLike[str], step: int, model: Any, optimizer_state: dict[str, Any],
                    trainer_state: dict[str, Any], keep: int = 2, staging: Path | None = None,
                    table_parts: dict[int, list[list[Any]]] | None = None) -> Path:
    """Write checkpoint ``step`` of a run; keep the newest ``keep`` checkpoints. Returns its folder.

    ``staging``: a :func:`staging_folder` other ranks have already written their table parts into (listed in
    ``table_parts``, see :func:`engram.parallel.write_table_shards`); it becomes the checkpoint.
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
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = {"format": CHECKPOINT_FORMAT, "step": step, "optimizer": skeleton,
                 "trainer": flatten_state(trainer_state, tensors, prefix="s")}
        extra = {k: v for k, v in tensors.items() if k.startswith("s")}
        save_file(extra, str(tmp / TRAINER_TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state))
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
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is missing or incomplete")
    return folder


def load_checkpoint(folder: str | os.PathLike[str]) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, optimizer_state, trainer_state)`` of a checkpoint folder (load the model with from_pretrained)."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    state = json.loads(state_path.read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{state_path}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    tensors.update(load_file(str(folder / TRAINER_TENSORS_FILE)))
    return state["step"], unflatten_state(state["optimizer"], tensors), unflatten_state(state["trainer"], tensors)
