"""Engram's ShortConv in plain torch: the specification the Triton kernels reproduce (``ShortConv.forward``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram.kernels.branch_norm import branch_rms_norm


def short_conv_naive(x: torch.Tensor, norm_weight: torch.Tensor, conv_weight: torch.Tensor, dilation: int,
                     eps: float | None, past: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each branch, zero the padding, convolve causally over time, SiLU.

    Args:
        x: ``[B, T, M, D]``; channel ``c = m * D + d`` of the convolution is dim ``d`` of branch ``m``.
        norm_weight: ``[M, D]`` per-branch RMSNorm weight (the norm runs in fp32, its result is cast to x's dtype).
        conv_weight: ``[M * D, 1, K]`` depthwise kernel, applied in x's dtype (cast to it, as autocast does).
        dilation: the conv's dilation; the causal window is ``P = (K - 1) * dilation`` positions.
        eps: RMSNorm epsilon; ``None`` is fp32 machine epsilon (as in ``F.rms_norm``).
        past: ``[B, M * D, P]`` normalised inputs of the positions just before ``x``; zeros when omitted.
        token_mask: ``[B, T]`` False at padding positions, whose normalised inputs are zeroed.
    Returns:
        ``(y [B, T, M, D], new_past [B, M * D, P])`` in x's dtype: ``new_past`` is the last P positions of
        ``cat(past, normalised inputs)``, the ``past`` of the next call.
    """
    batch, length, branches, dim = x.shape
    kernel_size = conv_weight.shape[-1]
    left_pad = (kernel_size - 1) * dilation
    normed = branch_rms_norm(x, norm_weight, eps).to(x.dtype)
    if token_mask is not None:
        normed = normed * token_mask[:, :, None, None].to(normed.dtype)
    channels_first = normed.reshape(batch, length, branches * dim).transpose(1, 2)  # [B, C, T]
    if past is None:
        past = channels_first.new_zeros(batch, branches * dim, left_pad)
    window = torch.cat([past.to(channels_first.dtype), channels_first], dim=-1)  # [B, C, P + T]
    conv = F.conv1d(window, conv_weight.to(window.dtype), dilation=dilation, groups=branches * dim)
    y = F.silu(conv).transpose(1, 2).reshape(batch, length, branches, dim)
    return y, window[..., window.shape[-1] - left_pad:]
