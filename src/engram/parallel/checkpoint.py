"""Checkpoints of a row-sharded model in the single-process format, so that a run resumes at any world size.

Saving gathers every sharded table and its SparseAdam moments onto rank 0, which writes exactly what a
single-process run writes (:func:`engram.train.checkpoint.save_checkpoint`); loading reads that full state on
every rank and keeps the rank's own rows. Resharding from W to W' ranks is therefore loading. The price: rank 0
holds one full copy of the tables in host memory while saving, and every rank while loading.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from engram.model import EngramLM
from engram.parallel.sharded_embedding import ShardedMultiHeadEmbedding, gather_rows


def sharded_tables(model: nn.Module) -> dict[str, ShardedMultiHeadEmbedding]:
    """``{parameter name: module}`` of every row-sharded table of ``model``, in ``named_parameters`` order."""
    modules = dict(model.named_modules())
    return {name: modules[name.rsplit(".", 1)[0]] for name, _ in model.named_parameters()
            if isinstance(modules.get(name.rsplit(".", 1)[0]), ShardedMultiHeadEmbedding)}


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _with_table_moments(optimizer_state: dict[str, Any], tables: dict[str, ShardedMultiHeadEmbedding],
                        shape_of: Callable[[ShardedMultiHeadEmbedding], list[int]],
                        convert: Callable[[ShardedMultiHeadEmbedding, Tensor], Tensor]) -> dict[str, Any]:
    """A copy of an :class:`engram.train.optim.EngramOptimizer` state dict whose tables' layout shapes are
    ``shape_of(module)`` and whose SparseAdam moments are ``convert(module, moment)``, table by table in layout
    order (the same on every rank, so ``convert`` may be a collective)."""
    state = copy.copy(optimizer_state)
    state["layout"] = copy.deepcopy(optimizer_state["layout"])
    layout = state["layout"]["groups"]["tables"]
    per_param = optimizer_state["optimizers"].get("tables", {"state": {}})["state"]
    converted = {}
    for index, (name, _) in enumerate(layout):
        module = tables[name]
        layout[index][1] = shape_of(module)
        if index in per_param:
            converted[index] = {key: convert(module, value) if key in _MOMENTS else value
                                for key, value in per_param[index].items()}
    if "tables" in state["optimizers"]:
        state["optimizers"] = {**state["optimizers"], "tables": {**state["optimizers"]["tables"], "state": converted}}
    return state


def gather_checkpoint_state(model: EngramLM, optimizer_state: dict[str, Any]
                            ) -> tuple[EngramLM | None, dict[str, Any] | None]:
    """The single-process model and optimiser state of a (possibly) row-sharded ``model``.

    Collective when ``model`` has sharded tables: every rank must call it; rank 0 gets a model holding the full
    tables (on the CPU) and the optimiser state with full-size table moments, the other ranks ``(None, None)``.
    Without sharded tables both are returned unchanged.
    """
    tables = sharded_tables(model)
    if not tables:
        return model, optimizer_state
    full_tables = {name: module.table().detach().cpu() for name, module in tables.items()}
    full_state = _with_table_moments(optimizer_state, tables, lambda module: [module.num_rows, module.head_dim],
                                     lambda module, moment: gather_rows(moment, module.shard, module.group).cpu())
    if dist.get_rank() != 0:
        return None, None
    full = EngramLM(model.cfg, hasher=model.hasher, table_device="meta")
    rest = {key: value.detach().cpu() for key, value in model.state_dict().items() if key not in full_tables}
    full.load_state_dict(rest, strict=False)
    for name, table in full_tables.items():
        full.get_submodule(name.rsplit(".", 1)[0]).weight = nn.Parameter(table)
    return full, full_state


def shard_optimizer_state(optimizer_state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A single-process optimiser state (full-size table moments) cut down to this rank's rows of ``model``'s
    sharded tables; returned unchanged when ``model`` has none."""
    tables = sharded_tables(model)
    if not tables:
        return optimizer_state
    for name, shape in optimizer_state["layout"]["groups"]["tables"]:
        module = tables[name]
        if list(shape) != [module.num_rows, module.head_dim]:
            raise ValueError(f"optimiser state holds table {name!r} with shape {list(shape)}, the model's table is "
                             f"[{module.num_rows}, {module.head_dim}]")
    return _with_table_moments(optimizer_state, tables, lambda module: list(module.weight.shape),
                               lambda module, moment: moment[module.shard.start:module.shard.end].clone())
