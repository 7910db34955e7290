"""One flat embedding table holding every hash head's rows back to back (brief §2.4).

The table is a parameter in the compute device's memory (training, and the ``device`` placement), or it
lives in a :class:`engram.storage.TableStore` (pinned host memory, a memory-mapped file, an HBM cache in front
of either) after :meth:`MultiHeadEmbedding.use_store`. Either way :meth:`MultiHeadEmbedding.fetch` issues the
read at once and returns a handle to wait on, so a model can start every layer's reads before its first block.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from engram.kernels.gather import multi_head_gather
from engram.storage import PendingRows, TableStore


def check_table_geometry(table_sizes: list[int], head_dim: int) -> None:
    """Raise ``ValueError`` unless there is at least one head, every head has rows, and rows have width."""
    if not table_sizes or min(table_sizes) < 1:
        raise ValueError(f"table_sizes must be a non-empty list of positive sizes, got {table_sizes}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")


def head_offsets(table_sizes: list[int]) -> torch.Tensor:
    """Row of the flat table where each head's rows start: ``[0, n_0, n_0 + n_1, ...]`` int64 ``[H]``."""
    return torch.tensor([0, *itertools.accumulate(table_sizes[:-1])], dtype=torch.long)


class MultiHeadEmbedding(nn.Module):
    """Rows of ``H`` hash heads, head ``h`` stored at ``offsets[h] : offsets[h] + table_sizes[h]``.

    Only rows that were read receive gradient. With ``sparse=True`` the gradient is a
    ``torch.sparse_coo`` tensor holding just those rows, so tables of billions of rows never
    materialise a dense gradient (use an optimiser that accepts sparse gradients, e.g. ``SparseAdam``).
    ``device="meta"`` allocates no table (for a store attached later).

    Example:
        >>> emb = MultiHeadEmbedding([7, 11, 13], head_dim=4)
        >>> emb(torch.tensor([[[6, 10, 12]]])).shape   # [B, T, H] -> [B, T, H * head_dim]
        torch.Size([1, 1, 12])
    """

    def __init__(self, table_sizes: list[int], head_dim: int, sparse: bool = False, init_std: float = 1.0,
                 device: torch.device | str | None = None):
        super().__init__()
        check_table_geometry(table_sizes, head_dim)
        self.table_sizes = [int(n) for n in table_sizes]
        self.head_dim = head_dim
        self.sparse = sparse
        self.init_std = init_std
        self.store: TableStore | None = None
        self.register_buffer("offsets", head_offsets(self.table_sizes), persistent=False)
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

    def reset_parameters(self) -> None:
        if self.store is None:
            nn.init.normal_(self.weight, std=self.init_std)

    def use_store(self, store: TableStore) -> None:
        """Read rows from ``store`` from now on; the parameter is dropped (the store holds the only copy)."""
        if (store.num_rows, store.dim) != (self.num_rows, self.head_dim):
            raise ValueError(f"store holds a [{store.num_rows}, {store.dim}] table, this embedding needs "
                             f"[{self.num_rows}, {self.head_dim}]")
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.store = store

    def table(self) -> torch.Tensor:
        """The full ``[R, head_dim]`` table: the parameter's data, or the store's CPU tensor (read-only on disk)."""
        return self.weight.detach() if self.store is None else self.store.table()

    def flat_row_ids(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row ids ``[..., H]`` -> rows of the flat table ``[..., H]``."""
        if row_ids.shape[-1] != self.num_heads:
            raise ValueError(f"row_ids must end in {self.num_heads} heads, got shape {tuple(row_ids.shape)}")
        return row_ids + self.offsets.to(row_ids.device)

    def fetch(self, row_ids: torch.Tensor) -> PendingRows:
        """Start reading ``[B, T, H]`` per-head row ids; ``wait()`` gives ``[B, T, H * head_dim]`` on their device."""
        flat_rows = self.flat_row_ids(row_ids)
        if self.store is None:
            return PendingRows.ready(multi_head_gather(self.weight, flat_rows, sparse_grad=self.sparse))
        return self.store.fetch(flat_rows, flat_rows.device).then(lambda rows: rows.flatten(start_dim=-2))

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` per-head row ids -> ``[B, T, H * head_dim]`` concatenated head vectors."""
        return self.fetch(row_ids).wait()

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, rows={self.num_rows}, head_dim={self.head_dim}, sparse={self.sparse}, "
                f"placement={self.placement}")
