"""One flat embedding table holding every hash head's rows back to back (brief §2.4)."""

from __future__ import annotations

import torch
from torch import nn

from engram.kernels.gather import multi_head_gather


class MultiHeadEmbedding(nn.Module):
    """Rows of ``H`` hash heads, head ``h`` stored at ``offsets[h] : offsets[h] + table_sizes[h]``.

    Only rows that were read receive gradient. With ``sparse=True`` the gradient is a
    ``torch.sparse_coo`` tensor holding just those rows, so tables of billions of rows never
    materialise a dense gradient (use an optimiser that accepts sparse gradients, e.g. ``SparseAdam``).

    Example:
        >>> emb = MultiHeadEmbedding([7, 11, 13], head_dim=4)
        >>> emb(torch.tensor([[[6, 10, 12]]])).shape   # [B, T, H] -> [B, T, H * head_dim]
        torch.Size([1, 1, 12])
    """

    def __init__(self, table_sizes: list[int], head_dim: int, sparse: bool = False, init_std: float = 1.0):
        super().__init__()
        if not table_sizes or min(table_sizes) < 1:
            raise ValueError(f"table_sizes must be a non-empty list of positive sizes, got {table_sizes}")
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        self.table_sizes = [int(n) for n in table_sizes]
        self.head_dim = head_dim
        self.sparse = sparse
        self.init_std = init_std
        offsets = [0]
        for size in self.table_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(self.table_sizes), head_dim))
        self.reset_parameters()

    @property
    def num_heads(self) -> int:
        return len(self.table_sizes)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def flat_row_ids(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row ids ``[..., H]`` -> rows of the flat table ``[..., H]``."""
        if row_ids.shape[-1] != self.num_heads:
            raise ValueError(f"row_ids must end in {self.num_heads} heads, got shape {tuple(row_ids.shape)}")
        return row_ids + self.offsets

    def forward(self, row_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` per-head row ids -> ``[B, T, H * head_dim]`` concatenated head vectors."""
        return multi_head_gather(self.weight, self.flat_row_ids(row_ids), sparse_grad=self.sparse)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, rows={self.num_rows}, head_dim={self.head_dim}, sparse={self.sparse}"
