"""``fused_short_conv``: Engram's ShortConv, Triton on CUDA (or forced under ``TRITON_INTERPRET=1``), naive elsewhere.

The Triton path is two ``torch.library`` custom ops (forward, backward) joined by ``register_autograd``, so
``torch.compile`` treats each as one opaque node. The forward op also returns the per-(token, branch) RMSNorm
reciprocal roots; the backward recomputes the normalised inputs and the conv's pre-activation from x and them
(nothing of size ``[B, T, M, D]`` is saved besides x). ``past`` is a constant: it gets no gradient (it still
enters the conv weight's gradient, and the gradient of ``new_past`` reaches x).
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from engram.kernels.dispatch import use_triton
from engram.kernels.shortconv.naive import short_conv_naive

_FP32_EPS = torch.finfo(torch.float32).eps


def _kernels() -> ModuleType:
    # Imported on first use: triton is optional, and @triton.jit reads TRITON_INTERPRET when it decorates.
    from engram.kernels.shortconv import triton_shortconv

    return triton_shortconv


@torch.library.custom_op("engram::short_conv_fwd", mutates_args=())
def _short_conv_fwd(x: Tensor, norm_weight: Tensor, conv_weight: Tensor, past: Optional[Tensor],
                    token_mask: Optional[Tensor], dilation: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().short_conv_fwd(x, norm_weight, conv_weight, past, token_mask, dilation, eps)


@_short_conv_fwd.register_fake
def _(x: Tensor, norm_weight: Tensor, conv_weight: Tensor, past: Optional[Tensor], token_mask: Optional[Tensor],
      dilation: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    batch, length, branches, dim = x.shape
    left_pad = (conv_weight.shape[-1] - 1) * dilation
    return (x.new_empty(x.shape), x.new_empty(batch, branches * dim, left_pad),
            x.new_empty(batch, length, branches, dtype=torch.float32))


@torch.library.custom_op("engram::short_conv_bwd", mutates_args=())
def _short_conv_bwd(grad_y: Tensor, grad_new_past: Optional[Tensor], x: Tensor, norm_weight: Tensor,
                    conv_weight: Tensor, past: Optional[Tensor], token_mask: Optional[Tensor], rstd: Tensor,
                    dilation: int) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().short_conv_bwd(grad_y, grad_new_past, x, norm_weight, conv_weight, past, token_mask, rstd,
                                     dilation)


@_short_conv_bwd.register_fake
def _(grad_y: Tensor, grad_new_past: Optional[Tensor], x: Tensor, norm_weight: Tensor, conv_weight: Tensor,
      past: Optional[Tensor], token_mask: Optional[Tensor], rstd: Tensor, dilation: int
      ) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), norm_weight.new_empty(norm_weight.shape), conv_weight.new_empty(conv_weight.shape)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, norm_weight, conv_weight, past, token_mask, dilation, _ = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, norm_weight, conv_weight, past, token_mask, output[2])
    ctx.dilation = dilation


def _backward(ctx, grad_y: Tensor | None, grad_new_past: Tensor | None, _grad_rstd: Tensor | None) -> tuple:
    x, norm_weight, conv_weight, past, token_mask, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grad_x, grad_norm_weight, grad_conv_weight = _short_conv_bwd(
        grad_y, grad_new_past, x, norm_weight, conv_weight, past, token_mask, rstd, ctx.dilation)
    return grad_x, grad_norm_weight, grad_conv_weight, None, None, None, None


_short_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_short_conv(x: Tensor, norm_weight: Tensor, conv_weight: Tensor, dilation: int, eps: float | None,
                     past: Tensor | None = None, token_mask: Tensor | None = None, force: bool | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Engram's ShortConv: ``(y [B, T, M, D], new_past [B, M * D, (K - 1) * dilation])``, both in x's dtype.

    Same arguments and result as :func:`~engram.kernels.shortconv.naive.short_conv_naive`; ``force`` picks the
    path as in :func:`~engram.kernels.dispatch.use_triton`. On the Triton path ``past`` is treated as a constant
    (no gradient flows into it); x, norm_weight and conv_weight get gradients, including through ``new_past``.
    """
    if x.dim() != 4:
        raise ValueError(f"fused_short_conv: x must be [B, T, M, D], got shape {tuple(x.shape)}")
    batch, length, branches, dim = x.shape
    channels = branches * dim
    if dilation < 1:
        raise ValueError(f"fused_short_conv: dilation must be >= 1, got {dilation}")
    if norm_weight.shape != (branches, dim) or conv_weight.dim() != 3 or conv_weight.shape[:2] != (channels, 1):
        raise ValueError(f"fused_short_conv: norm_weight {tuple(norm_weight.shape)} must be [M, D] = "
                         f"[{branches}, {dim}] and conv_weight {tuple(conv_weight.shape)} [M * D, 1, K]")
    left_pad = (conv_weight.shape[-1] - 1) * dilation
    if past is not None and past.shape != (batch, channels, left_pad):
        raise ValueError(f"fused_short_conv: past {tuple(past.shape)} must be [B, M * D, (K - 1) * dilation] = "
                         f"{(batch, channels, left_pad)}")
    if token_mask is not None and token_mask.shape != (batch, length):
        raise ValueError(f"fused_short_conv: token_mask {tuple(token_mask.shape)} must be [B, T] = "
                         f"{(batch, length)}")
    if not use_triton(x, force):
        return short_conv_naive(x, norm_weight, conv_weight, dilation, eps, past, token_mask)
    y, new_past, _ = _short_conv_fwd(x, norm_weight, conv_weight, past, token_mask, dilation,
                                     _FP32_EPS if eps is None else eps)
    return y, new_past
