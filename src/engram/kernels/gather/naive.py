"""The specifications of the multi-head gathers, in plain PyTorch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from engram.kernels.fp8 import dequantize_rows


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


def fp8_gather_naive(table: Tensor, flat_rows: Tensor) -> Tensor:
    """Dequantise, for every token, the packed FP8 rows of its ``H`` heads and concatenate them.

    Args:
        table: uint8 ``[R, D + D / 32]`` packed FP8 rows (:mod:`engram.kernels.fp8`: ``D`` E4M3 bytes, then one UE8M0
            scale byte per 32 values).
        flat_rows: ``[..., H]`` int rows of the flat table (head offsets already added), in ``[0, R)``
            (``IndexError`` otherwise).

    Returns:
        ``[..., H * D]`` fp32; head ``h`` fills ``[h * D, (h + 1) * D)``.
    """
    packed = table.index_select(0, flat_rows.reshape(-1).long()).view(*flat_rows.shape, table.shape[1])
    return dequantize_rows(packed).flatten(start_dim=-2)
