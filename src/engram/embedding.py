"""One flat embedding table holding every hash head's rows back to back (docs/design.md §3).

The table is a parameter in the compute device's memory (training, and the ``device`` placement), or it
lives in a :class:`engram.storage.store.TableStore` (pinned host memory, a memory-mapped file, an HBM cache in front
of either) after :meth:`MultiHeadEmbedding.use_store`. Either way :meth:`MultiHeadEmbedding.fetch` issues the
read at once and returns a handle to wait on, so a model can start every layer's reads before its first block.

:func:`table_views` changes what ``fetch`` returns from outside the model, for the calling thread only: a view sees
every read of its table (how per-request memory overlays are served, :mod:`engram.model.overlay`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from engram.kernels.fp8 import ROW_FORMATS, packed_row_bytes, quantize_rows, quantize_table
from engram.kernels.gather import fp8_gather, multi_head_gather
from engram.storage.store import PendingRows, TableStore


TableView = Callable[[torch.Tensor, PendingRows], PendingRows]
"""``(flat_rows [B, T, H], pending read of those rows) -> pending [B, T, H * head_dim]``: a table read as a view
shows it."""


class _ThreadViews(threading.local):
    def __init__(self) -> None:
        self.by_table: dict[nn.Module, TableView] = {}


_views = _ThreadViews()


@contextlib.contextmanager
def table_views(views: Mapping[nn.Module, TableView]) -> Iterator[None]:
    """Inside the block, every ``fetch`` of a table of ``views`` in this thread returns its view of the read.

    Other threads read the tables as they are, so a server thread can serve a batch through views while another
    runs the same model. Blocks nest; an inner view of a table replaces the outer one.

    Example:
        >>> emb = MultiHeadEmbedding([7, 11], head_dim=2)
        >>> with table_views({emb: lambda flat_rows, pending: pending.then(torch.zeros_like)}):
        ...     emb(torch.tensor([[[1, 2]]])).tolist()
        [[[0.0, 0.0, 0.0, 0.0]]]
    """
    outer = _views.by_table
    _views.by_table = {**outer, **views}
    try:
        yield
    finally:
        _views.by_table = outer


def has_view(table: nn.Module) -> bool:
    """Whether this thread reads ``table`` through a view (inside :func:`table_views`)."""
    return table in _views.by_table


def through_view(table: nn.Module, flat_rows: torch.Tensor, pending: PendingRows) -> PendingRows:
    """``pending`` (the read of ``flat_rows`` from ``table``) as this thread's view of ``table`` shows it
    (:func:`table_views`); ``pending`` itself without one."""
    view = _views.by_table.get(table)
    return pending if view is None else view(flat_rows, pending)


def check_table_geometry(table_sizes: list[int], head_dim: int) -> None:
    """Raise ``ValueError`` unless there is at least one head, every head has rows, and rows have width."""
    if not table_sizes or min(table_sizes) < 1:
        raise ValueError(f"table_sizes must be a non-empty list of positive sizes, got {table_sizes}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")


def head_offsets(table_sizes: list[int]) -> torch.Tensor:
    """Row of the flat table where each head's rows start: ``[0, n_0, n_0 + n_1, ...]`` int64 ``[H]``."""
    return torch.tensor([0, *itertools.accumulate(table_sizes[:-1])], dtype=torch.long)


def _dequantize_fetched(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP8 rows ``[..., H, D + D / 32]`` as a store delivered them -> ``[..., H * D]`` fp32 on their device.

    :func:`fp8_gather` over the rows in their order: one kernel on a GPU, :func:`engram.kernels.fp8.dequantize_rows`
    elsewhere.
    """
    positions = torch.arange(packed[..., 0].numel(), device=packed.device).view(packed.shape[:-1])
    return fp8_gather(packed.reshape(-1, packed.shape[-1]), positions)


def require_float_rows(embedding: nn.Module, action: str) -> None:
    """Raise ``ValueError`` if ``embedding`` holds packed FP8 rows: they are read-only (``action`` names what
    was refused, e.g. ``"training"``)."""
    if embedding.row_format == "fp8":
        raise ValueError(f"FP8 tables are read-only (packed E4M3 rows with UE8M0 scales, for serving): {action} "
                         "needs float rows; load the model with engram_table_format='float' from a float checkpoint")


def quantize_tables(model: nn.Module) -> int:
    """Turn the table of every :class:`MultiHeadEmbedding` under ``model`` into packed FP8 rows, in place
    (:meth:`MultiHeadEmbedding.quantize_`); returns how many there are.

    Example:
        >>> emb = MultiHeadEmbedding([7, 11], head_dim=32)
        >>> quantize_tables(emb), emb.row_format, tuple(emb.weight.shape)
        (1, 'fp8', (18, 33))
    """
    tables = [module for module in model.modules() if isinstance(module, MultiHeadEmbedding)]
    for table in tables:
        table.quantize_()
    return len(tables)


class MultiHeadEmbedding(nn.Module):
    """Rows of ``H`` hash heads, head ``h`` stored at ``offsets[h] : offsets[h] + table_sizes[h]``.

    Only rows that were read receive gradient. With ``sparse=True`` the gradient is a
    ``torch.sparse_coo`` tensor holding just those rows, so tables of billions of rows never
    materialise a dense gradient (use an optimiser that accepts sparse gradients, e.g. ``SparseAdam``).
    ``device="meta"`` allocates no table (for a store attached later).

    ``row_format="fp8"`` keeps every row as packed FP8 (``engram.kernels.fp8``: ``head_dim`` E4M3 bytes and one UE8M0
    scale per 32 values, ``head_dim + head_dim / 32`` bytes): ``weight`` is then a frozen uint8
    ``[R, head_dim + head_dim / 32]`` parameter, initialised by quantising N(0, init_std) rows, and lookups return
    the dequantised fp32 rows (:func:`engram.kernels.gather.fp8_gather`: one fused kernel on a GPU). FP8 tables
    are for reading (DeepSeek-V4.1's tables, serving); they are not trained. :meth:`quantize_` turns a float
    table into FP8 rows; :meth:`use_table` and :meth:`use_store` take a loaded table or a store of this format.

    Example:
        >>> emb = MultiHeadEmbedding([7, 11, 13], head_dim=4)
        >>> emb(torch.tensor([[[6, 10, 12]]])).shape   # [B, T, H] -> [B, T, H * head_dim]
        torch.Size([1, 1, 12])
    """

    def __init__(self, table_sizes: list[int], head_dim: int, sparse: bool = False, init_std: float = 1.0,
                 device: torch.device | str | None = None, row_format: str = "float"):
        super().__init__()
        check_table_geometry(table_sizes, head_dim)
        if row_format not in ROW_FORMATS:
            raise ValueError(f"row_format must be one of {ROW_FORMATS}, got {row_format!r}")
        self.table_sizes = [int(n) for n in table_sizes]
        self.head_dim = head_dim
        self.sparse = sparse
        self.init_std = init_std
        self.row_format = row_format
        self.store: TableStore | None = None
        self.register_buffer("offsets", head_offsets(self.table_sizes), persistent=False)
        if row_format == "fp8":
            self.weight = nn.Parameter(torch.empty(sum(self.table_sizes), packed_row_bytes(head_dim),
                                                   dtype=torch.uint8, device=device), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(sum(self.table_sizes), head_dim, device=device))
        self.reset_parameters()

    @property
    def num_heads(self) -> int:
        return len(self.table_sizes)

    @property
    def num_rows(self) -> int:
        return sum(self.table_sizes)

    @property
    def placement(self) -> str:
        """``"device"`` for the parameter, else the store's placement (``host``, ``disk``, ``cache``)."""
        return "device" if self.store is None else self.store.placement

    @property
    def row_width(self) -> int:
        """Elements of one stored row: ``head_dim``, or its packed FP8 bytes."""
        return packed_row_bytes(self.head_dim) if self.row_format == "fp8" else self.head_dim

    def reset_parameters(self) -> None:
        if self.store is not None or self.weight.is_meta:
            return
        if self.row_format == "fp8":
            with torch.no_grad():
                for start in range(0, self.num_rows, 1 << 20):  # in chunks: no full-size fp32 copy
                    rows = self.weight[start:start + (1 << 20)]
                    rows.copy_(quantize_rows(torch.randn(rows.shape[0], self.head_dim, device=rows.device)
                                             * self.init_std))
        else:
            nn.init.normal_(self.weight, std=self.init_std)

    def _check_table(self, num_rows: int, dim: int, dtype: torch.dtype, source: str) -> None:
        fp8_rows = dtype == torch.uint8
        if fp8_rows != (self.row_format == "fp8") or (not fp8_rows and not dtype.is_floating_point):
            held = "packed FP8 rows (uint8)" if fp8_rows else f"{dtype} rows"
            raise ValueError(f"{source} holds {held}, this embedding reads {self.row_format} rows")
        if (num_rows, dim) != (self.num_rows, self.row_width):
            raise ValueError(f"{source} holds a [{num_rows}, {dim}] table, this embedding needs "
                             f"[{self.num_rows}, {self.row_width}] ({self.row_format} rows)")

    def use_store(self, store: TableStore) -> None:
        """Read rows from ``store`` from now on; the parameter is dropped (the store holds the only copy).

        The store must hold this embedding's rows: ``[R, row_width]``, uint8 for ``row_format="fp8"``, a float
        dtype otherwise (``ValueError`` naming the difference).
        """
        self._check_table(store.num_rows, store.dim, store.dtype, "the store")
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.store = store

    def use_table(self, table: torch.Tensor) -> None:
        """Hold ``table`` (``[R, row_width]``: uint8 packed rows for ``row_format="fp8"``, float otherwise) as the
        parameter, e.g. a table file just loaded; checked like :meth:`use_store`. FP8 rows stay frozen."""
        if table.dim() != 2:
            raise ValueError(f"a table is a 2-D tensor [R, row_width], got shape {tuple(table.shape)}")
        self._check_table(*table.shape, table.dtype, "the table")
        self.store = None
        self.weight = nn.Parameter(table, requires_grad=self.row_format == "float")

    @torch.no_grad()
    def quantize_(self) -> None:
        """Turn the float rows into packed FP8 rows in place (:func:`engram.kernels.fp8.quantize_table`, chunk by chunk;
        the float table is released); ``row_format`` becomes ``"fp8"``. A ``meta`` table (nothing allocated, a
        table to load later) only changes format. A table in a store is refused: quantise it while loading
        (``open_table_store(row_format="fp8")``)."""
        if self.row_format == "fp8":
            return
        if self.store is not None:
            raise ValueError(f"this embedding's table sits in a {self.store.placement!r} store; quantise it while "
                             "loading (EngramLM.from_pretrained(engram_table_format='fp8'))")
        table = self.weight.detach()
        if table.is_meta:
            packed = torch.empty(self.num_rows, packed_row_bytes(self.head_dim), dtype=torch.uint8, device="meta")
        else:
            packed = quantize_table(table)
        del self._parameters["weight"]
        self.row_format = "fp8"
        self.weight = nn.Parameter(packed, requires_grad=False)

    def table(self) -> torch.Tensor:
        """The full ``[R, row_width]`` table as stored (packed uint8 for FP8 rows): the parameter's data, or the
        store's CPU tensor (read-only on disk)."""
        return self.weight.detach() if self.store is None else self.store.table()

    def flat_row_ids(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row ids ``[..., H]`` -> rows of the flat table ``[..., H]``."""
        if row_ids.shape[-1] != self.num_heads:
            raise ValueError(f"row_ids must end in {self.num_heads} heads, got shape {tuple(row_ids.shape)}")
        return row_ids + self.offsets.to(row_ids.device)

    def fetch(self, row_ids: torch.Tensor) -> PendingRows:
        """Start reading ``[B, T, H]`` per-head row ids; ``wait()`` gives ``[B, T, H * head_dim]`` on their device
        (as this thread's view of the table shows them, see :func:`table_views`)."""
        flat_rows = self.flat_row_ids(row_ids)
        return through_view(self, flat_rows, self._read(flat_rows))

    def _read(self, flat_rows: torch.Tensor) -> PendingRows:
        """Start reading ``[B, T, H]`` flat row ids from wherever the table lives."""
        if self.row_format == "fp8":
            if self.store is None:
                return PendingRows.ready(fp8_gather(self.weight, flat_rows))
            return self.store.fetch(flat_rows, flat_rows.device).then(_dequantize_fetched)
        if self.store is None:
            return PendingRows.ready(multi_head_gather(self.weight, flat_rows, sparse_grad=self.sparse))
        return self.store.fetch(flat_rows, flat_rows.device).then(lambda rows: rows.flatten(start_dim=-2))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` per-head row ids -> ``[B, T, H * head_dim]`` concatenated head vectors."""
        return self.fetch(row_ids).wait()

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, rows={self.num_rows}, head_dim={self.head_dim}, sparse={self.sparse}, "
                f"placement={self.placement}, row_format={self.row_format}")
