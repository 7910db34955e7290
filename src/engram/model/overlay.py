"""Per-request memories over shared tables: a :class:`RowOverlay` replaces some table rows for one batch row.

A memory patch (``engram.memory``) changes a few thousand rows of tables of millions. Serving many of them
from one model by copying tables would cost a table per memory; an overlay costs only its rows. Overlays are
applied from outside the model, behind its tables' ``fetch`` (:func:`engram.embedding.table_views`): inside
``with row_overlays(model, overlays):`` the model reads its base rows as usual, then every read swaps in, for
batch row ``b``, every head vector whose flat row id is in ``overlays[b]``: an exact copy, so a row read through
an overlay is bit-identical to the same row read from a table the patch was applied to.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engram.embedding import table_views
from engram.layer import Engram
from engram.storage.store import PendingRows

# Pads every batch row's sorted ids to one width; no flat row id of a real table reaches it.
_PAD_ROW = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class RowOverlay:
    """One memory's replacement rows over a model's base tables (copy-on-write: the base table is never copied).

    Attributes:
        layers: ``{layer_id: (rows, values)}``: ``rows`` int64 ``[N]`` sorted unique flat row ids of that
            layer's table (the rows of ``MultiHeadEmbedding.weight``, head offsets included), ``values``
            ``[N, head_dim]`` in the table's dtype.

    Example:
        >>> overlay = RowOverlay({1: (torch.tensor([3, 40]), torch.zeros(2, 16))})
        >>> overlay.num_rows
        2
    """

    layers: dict[int, tuple[Tensor, Tensor]]

    def __post_init__(self) -> None:
        for layer_id, (rows, values) in self.layers.items():
            if rows.dtype != torch.int64 or rows.dim() != 1:
                raise ValueError(f"overlay layer {layer_id}: rows must be int64 [N], got {rows.dtype} "
                                 f"{tuple(rows.shape)}")
            if values.dim() != 2 or values.shape[0] != rows.shape[0]:
                raise ValueError(f"overlay layer {layer_id}: values must be [N={rows.shape[0]}, head_dim], got "
                                 f"{tuple(values.shape)}")
            if rows.device != values.device:
                raise ValueError(f"overlay layer {layer_id}: rows on {rows.device}, values on {values.device}")
            # Checked where it costs no device synchronisation; a CUDA overlay comes from a checked CPU one (.to).
            if not rows.is_cuda and rows.numel() and (bool(rows[0] < 0) or not bool((rows[1:] > rows[:-1]).all())):
                raise ValueError(f"overlay layer {layer_id}: rows must be non-negative, sorted and unique")

    def to(self, device: torch.device | str) -> RowOverlay:
        """The same overlay with every tensor on ``device`` (do it once, not per forward)."""
        return RowOverlay({layer_id: (rows.to(device), values.to(device))
                           for layer_id, (rows, values) in self.layers.items()})

    @property
    def num_rows(self) -> int:
        """Rows over all layers."""
        return sum(rows.shape[0] for rows, _ in self.layers.values())


def check_row_overlays(overlays: Sequence[RowOverlay | None], head_dims: Mapping[int, int]) -> None:
    """Raise ``ValueError`` unless every entry is an overlay or ``None`` and every overlay names Engram layers of
    the model (``head_dims``: ``{layer_id: head_dim}``) with rows of their width."""
    for index, overlay in enumerate(overlays):
        if overlay is None:
            continue
        if not isinstance(overlay, RowOverlay):
            raise ValueError(f"row_overlays[{index}] must be a RowOverlay or None, got {type(overlay).__name__}")
        for layer_id, (_, values) in overlay.layers.items():
            if layer_id not in head_dims:
                raise ValueError(f"row_overlays[{index}] has rows for layer {layer_id}, which is not an Engram layer "
                                 f"of this model (Engram layers: {sorted(head_dims)})")
            if values.shape[1] != head_dims[layer_id]:
                raise ValueError(f"row_overlays[{index}] layer {layer_id}: rows of width {values.shape[1]}, the "
                                 f"table's are {head_dims[layer_id]}")


@dataclass(frozen=True)
class StackedOverlays:
    """The overlays of one batch, stacked once per Engram layer for :func:`replace_rows` (a decode reuses them
    at every step instead of re-stacking every overlay's rows per forward).

    Attributes:
        batch_size: the batch rows the overlays belong to.
        layers: ``{layer_id: (ids, values)}`` for the layers some overlay has rows for: ``ids`` int64 ``[B, W]``
            each batch row's sorted ids padded to the widest, ``values`` ``[B, W, head_dim]``.
    """

    batch_size: int
    layers: dict[int, tuple[Tensor, Tensor]]

    def view(self, layer_id: int, flat_rows: Tensor, pending: PendingRows) -> PendingRows:
        """Layer ``layer_id``'s table read ``pending`` of ``flat_rows`` ``[B, T, H]`` as the overlays show it
        (an :data:`engram.embedding.TableView`): every batch row's overlaid rows swapped in. ``ValueError`` unless
        the batch has one row per overlay."""
        if flat_rows.shape[0] != self.batch_size:
            raise ValueError(f"row_overlays has {self.batch_size} entries for a batch of {flat_rows.shape[0]} rows: "
                             "give one per batch row (None for the base memory)")
        stacked = self.layers.get(layer_id)
        if stacked is None:
            return pending
        return pending.then(functools.partial(replace_rows, flat_rows=flat_rows, stacked=stacked))


def stacked_rows(overlays: Sequence[RowOverlay | None], layer_id: int,
                 device: torch.device | str) -> tuple[Tensor, Tensor] | None:
    """``(ids [B, W], values [B, W, head_dim])`` of ``layer_id``'s rows in ``overlays`` (one per batch row) on
    ``device``, or ``None`` when none has rows there. Values keep the widest of the overlays' dtypes (an exact
    conversion), so that casting them to the table's dtype afterwards is what casting each directly would be."""
    entries = [overlay.layers.get(layer_id) if overlay is not None else None for overlay in overlays]
    present = [entry for entry in entries if entry is not None]
    width = max((rows.shape[0] for rows, _ in present), default=0)
    if width == 0:
        return None
    dtype = present[0][1].dtype
    for _, row_values in present[1:]:
        dtype = torch.promote_types(dtype, row_values.dtype)
    head_dim = present[0][1].shape[1]
    ids = torch.full((len(entries), width), _PAD_ROW, dtype=torch.int64, device=device)  # ascending per row
    values = torch.zeros(len(entries), width, head_dim, dtype=dtype, device=device)
    for b, entry in enumerate(entries):
        if entry is not None:
            rows, row_values = entry
            ids[b, :rows.shape[0]] = rows.to(device, non_blocking=True)
            values[b, :rows.shape[0]] = row_values.to(device, dtype, non_blocking=True)
    return ids, values


def stack_overlays(overlays: Sequence[RowOverlay | None], head_dims: Mapping[int, int],
                   device: torch.device | str) -> StackedOverlays:
    """Check ``overlays`` (one per batch row, see :func:`check_row_overlays`) and stack them for every layer of
    ``head_dims`` (``{layer_id: head_dim}``) on ``device``."""
    check_row_overlays(overlays, head_dims)
    layers = {layer_id: stacked for layer_id in head_dims
              if (stacked := stacked_rows(overlays, layer_id, device)) is not None}
    return StackedOverlays(len(overlays), layers)


@contextlib.contextmanager
def row_overlays(model: nn.Module, overlays: Sequence[RowOverlay | None],
                 device: torch.device | str | None = None) -> Iterator[None]:
    """Inside the block, batch row ``b`` of every forward of ``model`` in this thread reads ``overlays[b]``.

    ``overlays`` has one entry per batch row (``None``: the base tables); they are checked against the Engram
    layers under ``model`` and stacked once on ``device`` (default: that of ``model``'s first parameter, where its
    inputs are), so that a whole decode (:meth:`EngramLM.generate`, a server batch) reuses them. Every table read
    then goes through :meth:`StackedOverlays.view` (:func:`engram.embedding.table_views`); a forward whose batch
    has another number of rows raises ``ValueError``. Neither the model nor its tables change: other threads
    read the base tables meanwhile.

    Example:
        >>> with row_overlays(model, [patch.overlay(), None]):  # doctest: +SKIP
        ...     logits = model(ids).logits                       # row 0 reads the patch, row 1 the base tables
    """
    tables = {module.layer_id: module.multi_head_embedding for module in model.modules() if isinstance(module, Engram)}
    device = device if device is not None else next(model.parameters()).device
    stacked = stack_overlays(overlays, {layer_id: table.head_dim for layer_id, table in tables.items()}, device)
    with table_views({table: functools.partial(stacked.view, layer_id) for layer_id, table in tables.items()}):
        yield


def replace_rows(memory: Tensor, flat_rows: Tensor, stacked: tuple[Tensor, Tensor]) -> Tensor:
    """``memory`` ``[B, T, H * head_dim]`` with every head vector whose flat row id (``flat_rows`` ``[B, T, H]``)
    is among its batch row's ``stacked`` ids (:func:`stacked_rows`) replaced by that id's values, cast to
    ``memory``'s dtype. Plain torch, no host synchronisation: every row's ids are searched at once."""
    ids, values = stacked
    batch, length, heads = flat_rows.shape
    head_dim = memory.shape[-1] // heads
    query = flat_rows.reshape(batch, length * heads)  # [B, T * H]
    position = torch.searchsorted(ids, query).clamp_(max=ids.shape[1] - 1)
    hit = ids.gather(1, position) == query  # [B, T * H]
    replacement = values.gather(1, position.unsqueeze(-1).expand(-1, -1, head_dim)).to(memory.dtype)
    base = memory.reshape(batch, length * heads, head_dim)
    return torch.where(hit.unsqueeze(-1), replacement, base).reshape(memory.shape)


def overlay_rows(memory: Tensor, flat_rows: Tensor, overlays: Sequence[RowOverlay | None], layer_id: int) -> Tensor:
    """``memory`` with, in batch row ``b``, every head vector read from a row of ``overlays[b]`` replaced.

    Args:
        memory: ``[B, T, H * head_dim]`` the head vectors read from the base table (``MultiHeadEmbedding.fetch``).
        flat_rows: ``[B, T, H]`` int64 the flat row ids they were read from (``flat_row_ids``).
        overlays: one entry per batch row; ``None``, or an overlay without rows for ``layer_id``, keeps the base.
        layer_id: the Engram layer of ``memory``.
    Returns:
        ``[B, T, H * head_dim]`` in ``memory``'s dtype; the replaced vectors are exact copies of the overlay's
        values (cast to ``memory``'s dtype, as writing them into the table would). ``memory`` itself when no
        overlay has rows for ``layer_id``.

    Example:
        >>> memory = torch.zeros(2, 1, 2 * 3)                      # B=2, T=1, H=2 heads of width 3
        >>> rows = torch.tensor([[[4, 9]], [[4, 9]]])
        >>> overlay = RowOverlay({0: (torch.tensor([9]), torch.ones(1, 3))})
        >>> overlay_rows(memory, rows, [overlay, None], layer_id=0)[:, 0].tolist()
        [[0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    stacked = stacked_rows(overlays, layer_id, memory.device)
    return memory if stacked is None else replace_rows(memory, flat_rows, stacked)
