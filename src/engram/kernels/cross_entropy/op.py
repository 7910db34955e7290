"""``cross_entropy_rows``: Triton on CUDA (or forced under ``TRITON_INTERPRET=1``), naive elsewhere.

An eager building block: :mod:`engram.model.loss` calls it inside its own ``torch.library`` custom ops, which
``torch.compile`` treats as opaque nodes.
"""

from __future__ import annotations

import torch

from engram.kernels.cross_entropy.naive import naive_cross_entropy_rows
from engram.kernels.dispatch import use_triton


def cross_entropy_rows(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor,
                       row_scale: torch.Tensor | None = None, force: bool | None = None) -> torch.Tensor:
    """fp32 ``[c]`` cross entropy of the rows of ``logits`` ``[c, V]``; with ``row_scale`` the rows are overwritten
    with the loss's gradient. Arguments as :func:`~engram.kernels.cross_entropy.naive.naive_cross_entropy_rows`;
    ``force`` picks the path as in :func:`~engram.kernels.dispatch.use_triton`."""
    if logits.dim() != 2 or logits.stride(-1) != 1 or safe.shape != logits.shape[:1] or valid.shape != safe.shape:
        raise ValueError(f"cross_entropy_rows: logits must be [c, V] with unit stride along V and safe, valid [c]; "
                         f"got {tuple(logits.shape)} (strides {logits.stride()}), {tuple(safe.shape)}, "
                         f"{tuple(valid.shape)}")
    if not use_triton(logits, force):
        return naive_cross_entropy_rows(logits, safe, valid, row_scale)
    from engram.kernels.cross_entropy import triton_cross_entropy  # triton is optional; imported on first use

    return triton_cross_entropy.cross_entropy_rows(logits, safe.contiguous(), valid.contiguous(),
                                                   None if row_scale is None else row_scale.contiguous())
