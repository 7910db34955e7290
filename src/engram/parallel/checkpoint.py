"""Checkpoints of a row-sharded run: every rank writes its own rows, and a rank loading a checkpoint reads only
the rows it owns, at any world size (resharding is loading).

On top of the single-process checkpoint (:mod:`engram.train.checkpoint`, written by rank 0), a sharded run's
checkpoint folder holds, per Engram layer and per rank, the rank's table rows as a table file
``engram-layer-{L}.rows-{start}-{end}.safetensors`` (checksummed, :mod:`engram.storage.table_file`; listed in
``config.json``, so ``from_pretrained`` assembles the table) and their SparseAdam moments as
``optimizer-table-{L}.rows-{start}-{end}.safetensors`` (tensors ``exp_avg`` and ``exp_avg_sq``, checksummed:
:func:`engram.storage.checksums.write_safetensors`), which the optimiser state names in place of the moments. A
single-process checkpoint holds whole tables and moments; both kinds load at any world size. The ``final/``
model folder is written with whole tables (gathered), so that every placement of
:meth:`EngramLM.from_pretrained` reads it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from engram.embedding import MultiHeadEmbedding
from engram.model import EngramLM
from engram.model.serialization import table_file_name, table_metadata
from engram.parallel.sharded_embedding import TABLE_MODULES, ShardedMultiHeadEmbedding, row_shard
from engram.storage import write_table
from engram.storage.checksums import verify_safetensors, write_safetensors

TableModule = MultiHeadEmbedding | ShardedMultiHeadEmbedding
_MOMENTS = ("exp_avg", "exp_avg_sq")


def table_modules(model: nn.Module) -> dict[str, TableModule]:
    """``{parameter name: module}`` of every Engram table of ``model`` (whole or row-sharded)."""
    modules = dict(model.named_modules())
    return {name: modules[name.rsplit(".", 1)[0]] for name, _ in model.named_parameters()
            if isinstance(modules.get(name.rsplit(".", 1)[0]), TABLE_MODULES)}


def sharded_tables(model: nn.Module) -> dict[str, ShardedMultiHeadEmbedding]:
    """The row-sharded tables among :func:`table_modules`."""
    return {name: module for name, module in table_modules(model).items()
            if isinstance(module, ShardedMultiHeadEmbedding)}


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])  # "blocks.{layer}.engram.multi_head_embedding.weight"


def _moment_file_name(layer: int, start: int, end: int) -> str:
    return f"optimizer-table-{layer}.rows-{start}-{end}.safetensors"


def _rows_of(module: TableModule) -> tuple[int, int]:
    return (module.shard.start, module.shard.end) if isinstance(module, ShardedMultiHeadEmbedding) \
        else (0, module.num_rows)


def _with_table_moments(optimizer_state: dict[str, Any], tables: dict[str, TableModule],
                        shape_of: Callable[[TableModule], list[int]],
                        convert: Callable[[str, TableModule, str, Any], Any]) -> dict[str, Any]:
    """A copy of an :class:`engram.train.optim.EngramOptimizer` state dict whose tables' layout shapes are
    ``shape_of(module)`` and whose SparseAdam moments are ``convert(name, module, moment_name, moment)``."""
    state = copy.copy(optimizer_state)
    state["layout"] = copy.deepcopy(optimizer_state["layout"])
    layout = state["layout"]["groups"]["tables"]
    per_param = optimizer_state["optimizers"].get("tables", {"state": {}})["state"]
    converted = {}
    for index, (name, _) in enumerate(layout):
        module = tables[name]
        layout[index][1] = shape_of(module)
        if index in per_param:
            converted[index] = {key: convert(name, module, key, value) if key in _MOMENTS else value
                                for key, value in per_param[index].items()}
    if "tables" in state["optimizers"]:
        state["optimizers"] = {**state["optimizers"], "tables": {**state["optimizers"]["tables"], "state": converted}}
    return state


def write_table_shards(directory: str | Path, model: EngramLM, optimizer_state: dict[str, Any]
                       ) -> tuple[dict[int, list[list[Any]]], dict[str, Any]]:
    """Every rank: write this rank's rows of every sharded table, and their SparseAdam moments, into ``directory``.

    Returns the table parts of every layer (``[file, start, end]`` for each rank, for
    :meth:`EngramLM.save_pretrained`) and ``optimizer_state`` in the single-process layout with each table moment
    replaced by the list of its part files (what rank 0 saves).
    """
    directory = Path(directory)
    tables = sharded_tables(model)
    parts: dict[int, list[list[Any]]] = {}
    moment_parts: dict[str, list[list[Any]]] = {}
    for name, module in tables.items():
        layer = _layer_of(name)
        ranges = [(shard.start, shard.end) for shard in
                  (row_shard(module.num_rows, rank, module.shard.world_size) for rank in range(module.shard.world_size))
                  if shard.size]
        parts[layer] = [[table_file_name(layer, rows), *rows] for rows in ranges]
        moment_parts[name] = [[_moment_file_name(layer, *rows), *rows] for rows in ranges]
        if module.shard.size:
            write_table(directory / table_file_name(layer, _rows_of(module)), module.weight.detach().cpu(),
                        metadata=table_metadata(model, layer))
    per_param = optimizer_state["optimizers"].get("tables", {"state": {}})["state"]
    for index, (name, _) in enumerate(optimizer_state["layout"]["groups"]["tables"]):
        module = tables[name]
        if index in per_param and module.shard.size:
            moments = {key: per_param[index][key].detach().cpu().contiguous() for key in _MOMENTS}
            write_safetensors(directory / _moment_file_name(_layer_of(name), *_rows_of(module)), moments)
    state = _with_table_moments(optimizer_state, tables, lambda module: [module.num_rows, module.head_dim],
                                lambda name, module, key, moment: {"parts": moment_parts[name]})
    return parts, state


def _read_rows(directory: Path, parts: list[list[Any]], key: str, start: int, end: int, verified: set[str]
               ) -> Tensor:
    """Rows ``[start, end)`` of a moment stored in row parts ``[file, part_start, part_end]``; each part file read
    is checked first unless it is in ``verified`` (then added)."""
    pieces = []
    for file, part_start, part_end in parts:
        low, high = max(start, part_start), min(end, part_end)
        if low < high:
            if file not in verified:
                verify_safetensors(directory / file)
                verified.add(file)
            with safe_open(str(directory / file), framework="pt") as handle:
                pieces.append(handle.get_slice(key)[low - part_start:high - part_start])
    return torch.cat(pieces) if pieces else torch.empty(0)


def load_table_moments(optimizer_state: dict[str, Any], model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """A checkpoint's optimiser state (single-process layout; moments whole or in part files under ``directory``)
    cut to the table rows ``model`` holds here: all of them, or this rank's when its tables are row-sharded."""
    directory = Path(directory)
    tables = table_modules(model)
    for name, shape in optimizer_state["layout"]["groups"]["tables"]:
        module = tables.get(name)
        if module is None or list(shape) != [module.num_rows, module.head_dim]:
            raise ValueError(f"optimiser state holds table {name!r} of shape {list(shape)}, which this model does not "
                             "have")
    verified: set[str] = set()  # each part file holds two moments: check it once

    def cut(name: str, module: TableModule, key: str, moment: Any) -> Tensor:
        start, end = _rows_of(module)
        if isinstance(moment, Tensor):
            return moment if (start, end) == (0, moment.shape[0]) else moment[start:end].clone()
        return _read_rows(directory, moment["parts"], key, start, end, verified).reshape(end - start, module.head_dim)

    return _with_table_moments(optimizer_state, tables, lambda module: list(module.weight.shape), cut)


def gather_full_model(model: EngramLM) -> EngramLM | None:
    """``model`` with whole tables (on the CPU), for ``save_pretrained``: collective when ``model`` has sharded
    tables (every rank must call it; rank 0 gets the model, the others ``None``), else ``model`` itself."""
    tables = sharded_tables(model)
    if not tables:
        return model
    full_tables = {name: module.table().detach().cpu() for name, module in tables.items()}
    if dist.get_rank() != 0:
        return None
    full = EngramLM(model.cfg, hasher=model.hasher, table_device="meta")
    rest = {key: value.detach().cpu() for key, value in model.state_dict().items() if key not in full_tables}
    full.load_state_dict(rest, strict=False)
    for name, table in full_tables.items():
        full.get_submodule(name.rsplit(".", 1)[0]).weight = nn.Parameter(table)
    return full
