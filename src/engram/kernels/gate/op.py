"""``fused_gate``: the Engram gate, Triton on CUDA (or forced under ``TRITON_INTERPRET=1``), naive elsewhere.

The Triton path is two ``torch.library`` custom ops (forward, backward) joined by ``register_autograd``, so
``torch.compile`` treats each as one opaque node. The forward op also returns the per-(token, branch) RMSNorm
reciprocal roots and the score, which are all the backward needs besides the inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engram.kernels.dispatch import use_triton
from engram.kernels.gate.naive import naive_gate

_FP32_EPS = torch.finfo(torch.float32).eps


def _kernels():
    # Imported on first use: triton is optional, and @triton.jit reads TRITON_INTERPRET when it decorates.
    from engram.kernels.gate import triton_gate

    return triton_gate


@torch.library.custom_op("engram::gate_fwd", mutates_args=())
def _gate_fwd(keys: Tensor, hidden: Tensor, value: Tensor, key_norm_weight: Tensor, query_norm_weight: Tensor,
              key_eps: float, query_eps: float, zero_positive: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().gate_fwd(keys, hidden, value, key_norm_weight, query_norm_weight, key_eps, query_eps,
                               zero_positive)


@_gate_fwd.register_fake
def _(keys: Tensor, hidden: Tensor, value: Tensor, key_norm_weight: Tensor, query_norm_weight: Tensor,
      key_eps: float, query_eps: float, zero_positive: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gated = keys.new_empty(keys.shape, dtype=value.dtype)
    return (gated, *(keys.new_empty(keys.shape[:-1], dtype=torch.float32) for _ in range(4)))


@torch.library.custom_op("engram::gate_bwd", mutates_args=())
def _gate_bwd(grad_gated: Tensor, grad_gates: Tensor, keys: Tensor, hidden: Tensor, value: Tensor,
              key_norm_weight: Tensor, query_norm_weight: Tensor, gates: Tensor, rstd_k: Tensor, rstd_q: Tensor,
              score: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().gate_bwd(grad_gated, grad_gates, keys, hidden, value, key_norm_weight, query_norm_weight,
                    gates, rstd_k, rstd_q, score)


@_gate_bwd.register_fake
def _(grad_gated: Tensor, grad_gates: Tensor, keys: Tensor, hidden: Tensor, value: Tensor,
      key_norm_weight: Tensor, query_norm_weight: Tensor, gates: Tensor, rstd_k: Tensor, rstd_q: Tensor,
      score: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(x.new_empty(x.shape) for x in (keys, hidden, value, key_norm_weight, query_norm_weight))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    keys, hidden, value, key_norm_weight, query_norm_weight, *_ = inputs
    _, gates, rstd_k, rstd_q, score = output
    ctx.save_for_backward(keys, hidden, value, key_norm_weight, query_norm_weight, gates, rstd_k, rstd_q, score)


def _backward(ctx, grad_gated: Tensor, grad_gates: Tensor, *_: Tensor) -> tuple:
    grads = _gate_bwd(grad_gated, grad_gates, *ctx.saved_tensors)
    return (*grads, None, None, None)


_gate_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_gate(keys: Tensor, hidden: Tensor, value: Tensor, key_norm_weight: Tensor, query_norm_weight: Tensor,
               key_eps: float | None = None, query_eps: float | None = None, zero_positive: bool = False,
               force: bool | None = None) -> tuple[Tensor, Tensor]:
    """The Engram gate: ``(gated [B, T, M, D] in value's dtype, gates [B, T, M] fp32)``.

    Same arguments and result as :func:`~engram.kernels.gate.naive.naive_gate`; ``force`` picks the path as in
    :func:`~engram.kernels.dispatch.use_triton`. Inputs need not be contiguous (slices of one projection are
    read in place) but a non-unit stride along D costs a copy.
    """
    branches, dim = keys.shape[-2:]
    if (hidden.shape != keys.shape or value.shape != keys.shape[:-2] + (dim,)
            or key_norm_weight.shape != (branches, dim) or query_norm_weight.shape != (branches, dim)):
        raise ValueError(f"fused_gate: keys {tuple(keys.shape)} and hidden {tuple(hidden.shape)} must be "
                         f"[..., M, D], value {tuple(value.shape)} [..., D] and the norm weights "
                         f"{tuple(key_norm_weight.shape)}, {tuple(query_norm_weight.shape)} [M, D]")
    if not use_triton(keys, force):
        return naive_gate(keys, hidden, value, key_norm_weight, query_norm_weight, key_eps, query_eps,
                          zero_positive)
    gated, gates, *_ = _gate_fwd(keys, hidden, value, key_norm_weight, query_norm_weight,
                                 _FP32_EPS if key_eps is None else key_eps,
                                 _FP32_EPS if query_eps is None else query_eps, zero_positive)
    return gated, gates
