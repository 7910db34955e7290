"""``sinkhorn``: Sinkhorn-Knopp, Triton on CUDA (or forced under ``TRITON_INTERPRET=1``), naive elsewhere.

The Triton path is two ``torch.library`` custom ops (forward, backward) joined by ``register_autograd``, so
``torch.compile`` treats each as one opaque node (one launch each, where the plain-torch version compiles to
~20). The backward needs only the logits: it recomputes the iterations instead of saving them.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from engram.kernels.dispatch import use_triton
from engram.kernels.sinkhorn.naive import check_sinkhorn_args, naive_sinkhorn


def _kernels() -> ModuleType:
    # Imported on first use: triton is optional, and @triton.jit reads TRITON_INTERPRET when it decorates.
    from engram.kernels.sinkhorn import triton_sinkhorn

    return triton_sinkhorn


@torch.library.custom_op("engram::sinkhorn_fwd", mutates_args=())
def _sinkhorn_fwd(logits: Tensor, iters: int) -> Tensor:
    return _kernels().sinkhorn_fwd(logits, iters)


@_sinkhorn_fwd.register_fake
def _(logits: Tensor, iters: int) -> Tensor:
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("engram::sinkhorn_bwd", mutates_args=())
def _sinkhorn_bwd(grad: Tensor, logits: Tensor, iters: int) -> Tensor:
    return _kernels().sinkhorn_bwd(grad, logits, iters)


@_sinkhorn_bwd.register_fake
def _(grad: Tensor, logits: Tensor, iters: int) -> Tensor:
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    logits, ctx.iters = inputs
    ctx.save_for_backward(logits)


def _backward(ctx, grad: Tensor) -> tuple:
    (logits,) = ctx.saved_tensors
    return _sinkhorn_bwd(grad, logits, ctx.iters), None


_sinkhorn_fwd.register_autograd(_backward, setup_context=_setup_context)


def sinkhorn(logits: Tensor, iters: int, force: bool | None = None) -> Tensor:
    """Sinkhorn-Knopp projection of ``exp(logits)``: fp32 ``[..., M, M]`` from ``[..., M, M]`` logits.

    Same arguments and result as :func:`~engram.kernels.sinkhorn.naive.naive_sinkhorn` (differentiable on
    both paths); ``force`` picks the path as in :func:`~engram.kernels.dispatch.use_triton`. The logits may have
    any float dtype and strides (a slice of a projection is read in place).
    """
    check_sinkhorn_args(logits, iters)
    if not use_triton(logits, force):
        return naive_sinkhorn(logits, iters)
    return _sinkhorn_fwd(logits, iters)
