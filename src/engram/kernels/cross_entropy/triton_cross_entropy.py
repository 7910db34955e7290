"""Triton kernel of :func:`~engram.kernels.cross_entropy.cross_entropy_rows` (``naive.py`` is the specification).

One program per row: a first pass over the vocabulary keeps the running max and sum of exponentials (the
log-sum-exp in fp32), a second overwrites the row with its gradient in the logits' dtype. The row is read twice
and written once in its own dtype (bf16 under autocast): no fp32 copy of the logits is made. The vocabulary size
is a compile-time constant (a model constant; Triton's interpreter needs constant loop bounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram.kernels.dispatch import kernel_output

_MAX_BLOCK = 8192  # vocabulary entries per step of a row's loop


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, safe_ptr, valid_ptr, scale_ptr, loss_ptr, stride_row,
                               V: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    running_max = -float("inf")
    running_sum = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(safe_ptr + row)
    valid = tl.load(valid_ptr + row) != 0
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row)
        for v0 in range(0, V, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor,
                       row_scale: torch.Tensor | None) -> torch.Tensor:
    """See :func:`~engram.kernels.cross_entropy.naive.naive_cross_entropy_rows`; ``logits`` has unit stride along
    the vocabulary."""
    rows, vocab = logits.shape
    losses = kernel_output((rows,), torch.float32, logits.device)
    if rows:
        scale = row_scale if row_scale is not None else losses  # unread without WRITE_GRAD
        _cross_entropy_rows_kernel[(rows,)](logits, safe, valid, scale, losses, logits.stride(0), V=vocab,
                                            WRITE_GRAD=row_scale is not None,
                                            BLOCK=min(_MAX_BLOCK, triton.next_power_of_2(vocab)), num_warps=8)
    return losses
