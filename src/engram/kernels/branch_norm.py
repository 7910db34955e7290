"""The per-branch RMSNorm every Engram op uses, in plain torch (the gate and ShortConv specifications share it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def branch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """RMSNorm over the last dim with one weight row per branch: ``[..., M, D]`` x ``[M, D]`` -> fp32 ``[..., M, D]``.

    Computed in fp32 whatever ``x``'s dtype; ``eps=None`` is fp32 machine epsilon (as in ``F.rms_norm``).
    """
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight.float()
