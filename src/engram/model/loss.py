"""Cross entropy of a linear readout without the ``[N, V]`` logits: the language model's one loss path.

:func:`linear_cross_entropy` equals :func:`linear_cross_entropy_reference` (its plain twin,
``F.cross_entropy(F.linear(hidden, weight).float(), targets)``) within the rounding of the compute dtype, but
holds the logits of one chunk of tokens at a time (``chunk_size`` rows, by default about 2^29 logits,
:func:`default_chunk_size`). With V = 129,280 and 16 x 1024 tokens the plain path's fp32 logits alone are
8.5 GB.

- Training (grad enabled, ``reduction`` ``"mean"`` or ``"sum"``): the forward computes, chunk by chunk, the
  logits in the compute dtype, then the fp32 log-sum-exp and token losses and right away the gradient of the
  loss with respect to those logits (softmax - one-hot, scaled for the reduction, 0 for ignored tokens),
  written over the logits (:func:`engram.kernels.cross_entropy.cross_entropy_rows`: one Triton kernel on
  CUDA), from which it accumulates the gradients of ``hidden`` and ``weight``; backward only scales them by the
  incoming gradient (the fused linear cross entropy of Liger-Kernel). Nothing of size ``[N, V]`` is kept.
- ``reduction="none"`` with grad recomputes each chunk's logits in backward (its per-token incoming gradient
  cannot be folded into the weight's gradient ahead of time).
- Without grad (``torch.no_grad`` or inputs that need none): the chunked losses only, no gradient work.

The chunk loops are ``torch.library`` custom ops: ``torch.compile`` sees each as one opaque node, so it neither
unrolls the loop nor keeps several chunks' logits alive (measured: an inlined loop peaked at twice the plain
path's memory under inductor).

Dtypes: under autocast (CUDA or CPU) the matmuls run in the autocast dtype and the softmax math in fp32, as
``F.linear`` followed by ``.float()`` does; otherwise in the inputs' (promoted) dtype. The weight's gradient is
accumulated over the chunks in fp32 and cast to the weight's dtype once; each chunk's gradient of ``hidden``
is computed in the compute dtype and stored in ``hidden``'s dtype, as the plain path's autocast cast does.
Shapes are static, so the op traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from engram.kernels.cross_entropy import cross_entropy_rows

# Logits of one chunk: 2^29 elements, 1 GB in bf16 (4,096 tokens at V = 129,280). Smaller chunks cost time: each
# chunk adds its [V, D] product into the weight's fp32 gradient (H200, 16,384 tokens, D 512, compiled: 4,096-token
# chunks 14.7 ms and 2.6 GB, 2,048 16.0 ms and 1.5 GB, 512 23.5 ms and 0.7 GB; benchmarks/results/bench_loss.md).
LOGIT_CHUNK_ELEMENTS = 2**29
REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: ``LOGIT_CHUNK_ELEMENTS // vocab_size`` (at least 1), rounded down to a multiple of 64
    above 64 so that the chunk's matmuls tile evenly."""
    rows = max(1, LOGIT_CHUNK_ELEMENTS // vocab_size)
    return rows - rows % 64 if rows > 64 else rows


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The plain twin of :func:`linear_cross_entropy`: the full ``[N, V]`` fp32 logits, then cross entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross entropy of the logits ``hidden @ weight.T`` against ``targets``, computed ``chunk_size`` tokens at a
    time.

    Args:
        hidden: ``[N, D]`` token states (e.g. after the final norm).
        weight: ``[V, D]`` readout (the LM head or the tied embedding).
        targets: int64 ``[N]`` class ids in ``[0, V)``, or ``ignore_index`` for tokens that take no part.
        reduction: ``"mean"`` over the tokens not ignored (nan when every token is, as ``F.cross_entropy``),
            ``"sum"``, or ``"none"`` (fp32 ``[N]``, 0 at ignored tokens).
        chunk_size: tokens per chunk; ``None``: :func:`default_chunk_size` of V.
    Returns:
        the fp32 loss: a scalar, or ``[N]`` for ``"none"``.
    """
    chunk_size = _checked(hidden, weight, targets, ignore_index, reduction, chunk_size)
    dtype = _compute_dtype(hidden, weight)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if needs_grad and reduction != "none":
        loss, _, _ = _fused_loss(hidden, weight, targets, ignore_index, reduction == "mean", chunk_size, dtype,
                                 hidden.requires_grad, weight.requires_grad)
        return loss
    losses = _token_losses(hidden, weight, targets, ignore_index, chunk_size, dtype)
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / (targets != ignore_index).sum() if reduction == "mean" else total


def _checked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
             chunk_size: int | None) -> int:
    """Validate the arguments; returns the chunk size to use. Target values are checked outside
    ``torch.compile`` only (the check reads them on the host)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [N] = [{hidden.shape[0]}], got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = weight.shape[0]
    if not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"target {int(targets[bad][0])} is outside [0, {vocab}) and is not "
                             f"ignore_index={ignore_index}")
    return chunk_size or default_chunk_size(vocab)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's for the device when autocast is on, else the inputs' promoted dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _autocast_off(hidden: Tensor) -> torch.autocast:
    """The op casts explicitly: autocast must not recast its fp32 accumulations."""
    return torch.autocast(hidden.device.type, enabled=False)


@functools.cache
def _addmm_to_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(fp32, a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device``
    (CUDA with a torch that has ``out_dtype``; probed once per device and dtype)."""
    if device.type != "cuda":
        return False
    a = torch.ones(16, 16, dtype=dtype, device=device)
    try:
        out = torch.addmm(torch.ones(16, 16, device=device), a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return out.dtype == torch.float32 and bool((out == 17).all())


class _Grads:
    """Gradients of ``hidden`` (written per chunk, in its dtype) and ``weight`` (an fp32 sum over the chunks, cast
    to its dtype at the end) from the chunks' logit gradients; an unwanted one is an empty tensor."""

    def __init__(self, hidden: Tensor, weight: Tensor, hidden_grad: bool, weight_grad: bool):
        self.hidden = torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0)
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
        self.weight_like = weight.new_empty(0)

    def add(self, start: int, logit_grad: Tensor, hidden: Tensor, weight: Tensor) -> None:
        """Fold in the chunk at ``start``: ``logit_grad`` ``[c, V]`` of ``hidden`` ``[c, D]`` (compute dtype)."""
        if self.hidden.numel():
            self.hidden[start:start + hidden.shape[0]] = logit_grad @ weight
        if self.weight is not None:
            if logit_grad.dtype == torch.float32:
                self.weight.addmm_(logit_grad.T, hidden)
            elif _addmm_to_fp32(logit_grad.device, logit_grad.dtype):
                # the fp32 sum is added in the GEMM's epilogue instead of a separate [V, D] add kernel
                self.weight = torch.addmm(self.weight, logit_grad.T, hidden, out_dtype=torch.float32)
            else:
                self.weight += logit_grad.T @ hidden

    def result(self) -> tuple[Tensor, Tensor]:
        return self.hidden, self.weight_like if self.weight is None else self.weight.to(self.weight_like.dtype)


def _chunk_pass(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int,
                dtype: torch.dtype, row_scale: Tensor | None = None, grads: _Grads | None = None) -> Tensor:
    """fp32 ``[N]`` token losses, one chunk of logits at a time; with ``row_scale`` (fp32 ``[N]``, 0 at ignored
    targets) each chunk's gradient of ``sum(row_scale * losses)`` is folded into ``grads``."""
    with _autocast_off(hidden):
        x, w = hidden.to(dtype), weight.to(dtype)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = x[start:end] @ w.T
            scale = None if row_scale is None else row_scale[start:end]
            losses[start:end] = cross_entropy_rows(logits, safe[start:end], valid[start:end], scale)
            if grads is not None:
                grads.add(start, logits, x[start:end], w)
        return losses


def _gradient_shapes(hidden: Tensor, weight: Tensor, hidden_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor]:
    return (hidden.new_empty(hidden.shape if hidden_grad else (0,)),
            weight.new_empty(weight.shape if weight_grad else (0,)))


@torch.library.custom_op("engram::linear_cross_entropy_fused", mutates_args=())
def _fused_loss(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, mean: bool, chunk_size: int,
                dtype: torch.dtype, hidden_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The mean or summed loss and its gradients for an incoming gradient of 1 (empty when not wanted)."""
    valid = targets != ignore_index
    count = valid.sum()
    row_scale = valid / count.clamp(min=1) if mean else valid.float()
    grads = _Grads(hidden, weight, hidden_grad, weight_grad)
    total = _chunk_pass(hidden, weight, targets, ignore_index, chunk_size, dtype, row_scale, grads).sum()
    return (total / count if mean else total), *grads.result()


@_fused_loss.register_fake
def _(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, mean: bool, chunk_size: int,
      dtype: torch.dtype, hidden_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return hidden.new_empty((), dtype=torch.float32), *_gradient_shapes(hidden, weight, hidden_grad, weight_grad)


def _fused_setup(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(output[1], output[2])
    ctx.wanted = inputs[7:9]


def _fused_backward(ctx, grad_loss: Tensor, *_: Tensor) -> tuple:
    hidden_grad, weight_grad = ctx.saved_tensors
    return (hidden_grad * grad_loss if ctx.wanted[0] else None, weight_grad * grad_loss if ctx.wanted[1] else None,
            None, None, None, None, None, None, None)


_fused_loss.register_autograd(_fused_backward, setup_context=_fused_setup)


@torch.library.custom_op("engram::linear_cross_entropy_tokens", mutates_args=())
def _token_losses(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int,
                  dtype: torch.dtype) -> Tensor:
    """fp32 ``[N]`` token losses, 0 at ignored targets."""
    return _chunk_pass(hidden, weight, targets, ignore_index, chunk_size, dtype)


@_token_losses.register_fake
def _(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int,
      dtype: torch.dtype) -> Tensor:
    return hidden.new_empty(hidden.shape[:1], dtype=torch.float32)


@torch.library.custom_op("engram::linear_cross_entropy_tokens_backward", mutates_args=())
def _token_losses_backward(grad_losses: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                           chunk_size: int, dtype: torch.dtype, hidden_grad: bool,
                           weight_grad: bool) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad_losses * token losses)``, each chunk's logits recomputed."""
    row_scale = torch.where(targets != ignore_index, grad_losses.float(), 0.0)
    grads = _Grads(hidden, weight, hidden_grad, weight_grad)
    _chunk_pass(hidden, weight, targets, ignore_index, chunk_size, dtype, row_scale, grads)
    return grads.result()


@_token_losses_backward.register_fake
def _(grad_losses: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int,
      dtype: torch.dtype, hidden_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor]:
    return _gradient_shapes(hidden, weight, hidden_grad, weight_grad)


def _tokens_setup(ctx, inputs: tuple, output: Tensor) -> None:
    hidden, weight, targets, *ctx.options = inputs
    ctx.save_for_backward(hidden, weight, targets)


def _tokens_backward(ctx, grad_losses: Tensor) -> tuple:
    hidden, weight, targets = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:2]
    hidden_grad, weight_grad = _token_losses_backward(grad_losses, hidden, weight, targets, *ctx.options, *wanted)
    return (hidden_grad if wanted[0] else None, weight_grad if wanted[1] else None, None, None, None, None)


_token_losses.register_autograd(_tokens_backward, setup_context=_tokens_setup)
