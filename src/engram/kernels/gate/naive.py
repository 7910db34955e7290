"""The Engram gate in plain torch: the specification the Triton kernels reproduce (the ops of ``Engram.forward``)."""

from __future__ import annotations

import math

import torch

from engram.kernels.branch_norm import branch_rms_norm

GATE_FLOOR = 1e-6


def naive_gate(keys: torch.Tensor, hidden: torch.Tensor, value: torch.Tensor, key_norm_weight: torch.Tensor,
               query_norm_weight: torch.Tensor, key_eps: float | None = None, query_eps: float | None = None,
               zero_positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate the shared value by each branch's agreement between its key and the hidden state.

    Args:
        keys: ``[B, T, M, D]`` per-branch keys ``W_K^(m) e_t``.
        hidden: ``[B, T, M, D]`` hidden state of each residual branch (the query).
        value: ``[B, T, D]`` the value ``W_V e_t``, shared by the branches.
        key_norm_weight, query_norm_weight: ``[M, D]`` per-branch RMSNorm weights.
        key_eps, query_eps: RMSNorm epsilons; ``None`` is fp32 machine epsilon (as in ``F.rms_norm``).
        zero_positive: ``sign(0)`` is +1, not 0: a score of exactly 0 gets ``sigmoid(+sqrt(1e-6))`` (0.50025,
            as DeepSeek-V4.1's engines compute it) instead of 0.5.
    Returns:
        ``(gated [B, T, M, D] in value's dtype, gates [B, T, M] fp32)`` with, in fp32,
        ``s = <rmsnorm(keys) * w_k, rmsnorm(hidden) * w_q> / sqrt(D)``,
        ``gates = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))`` and ``gated = gates * value``.
    """
    dim = keys.shape[-1]
    normed_keys = branch_rms_norm(keys, key_norm_weight, key_eps)
    normed_hidden = branch_rms_norm(hidden, query_norm_weight, query_eps)
    score = (normed_keys * normed_hidden).sum(-1) / math.sqrt(dim)
    sign = score.sign()
    if zero_positive:
        sign = sign.masked_fill(score == 0, 1.0)
    gates = torch.sigmoid(sign * score.abs().clamp_min(GATE_FLOOR).sqrt())
    gated = gates.unsqueeze(-1).to(value.dtype) * value.unsqueeze(2)
    return gated, gates
