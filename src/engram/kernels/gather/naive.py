"""The specification of the multi-head gather, in plain PyTorch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def multi_head_gather_naive(weight: Tensor, flat_rows: Tensor, sparse_grad: bool = True) -> Tensor:
    """Concatenate, for every token, the table rows of its ``H`` heads.

    Args:
        weight: ``[R, D]`` the flat table of every head's rows.
        flat_rows: ``[..., H]`` int rows of the flat table (head offsets already added), in ``[0, R)``.
        sparse_grad: the gradient of ``weight`` is a ``torch.sparse_coo`` tensor of the rows read
            (uncoalesced here: one entry per read) instead of a dense ``[R, D]`` tensor.

    Returns:
        ``[..., H * D]`` in ``weight``'s dtype; head ``h`` fills ``[h * D, (h + 1) * D)``.
    """
    return F.embedding(flat_rows, weight, sparse=sparse_grad).flatten(start_dim=-2)
