"""Sinkhorn-Knopp in plain torch: the specification the Triton kernels reproduce (mHC's ``H_res`` projection)."""

from __future__ import annotations

import torch

# Added to exp(logits - rowmax) (whose row maxima are 1): keeps the matrix strictly positive, as Sinkhorn's
# theorem requires, where fp32 exp underflows a whole column to 0 (logit gaps > ~87).
SINKHORN_FLOOR = 1e-6


def check_sinkhorn_args(logits: torch.Tensor, iters: int, name: str = "sinkhorn") -> None:
    """Raise ``ValueError`` unless ``logits`` is a float ``[..., M, M]`` with ``M >= 1`` and ``iters`` an int >= 1."""
    if isinstance(iters, bool) or not isinstance(iters, (int, torch.SymInt)) or iters < 1:
        raise ValueError(f"{name}: iters must be an int >= 1, got {iters!r}")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or logits.shape[-1] < 1:
        raise ValueError(f"{name}: logits must have shape [..., M, M] with M >= 1, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name}: logits must be a float tensor, got {logits.dtype}")


def naive_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)`` towards the doubly stochastic matrices.

    Starts from ``exp(logits - rowmax) + SINKHORN_FLOOR`` and then, ``iters`` times, normalises the rows and then
    the columns to sum 1. Plain autograd flows through every iteration (and through the row max, whose gradient
    autograd splits evenly among tied maxima).

    Args:
        logits: ``[..., M, M]`` any float dtype; computed in fp32.
        iters: number of (row, column) normalisation rounds, >= 1.
    Returns:
        ``[..., M, M]`` fp32, non-negative; its column sums are 1 up to fp32 rounding.
    """
    check_sinkhorn_args(logits, iters, "naive_sinkhorn")
    logits = logits.float()
    p = torch.exp(logits - logits.amax(dim=-1, keepdim=True)) + SINKHORN_FLOOR
    for _ in range(iters):
        p = p / p.sum(dim=-1, keepdim=True)
        p = p / p.sum(dim=-2, keepdim=True)
    return p
