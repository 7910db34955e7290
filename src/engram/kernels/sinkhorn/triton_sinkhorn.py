"""Triton kernels for Sinkhorn-Knopp (see ``naive.py`` for the specification).

Tensors are seen as ``[N, M, M]`` matrices, one per token, at any strides. Each program takes ``BLOCK_T`` tokens
as a ``[BLOCK_T, BLOCK_M, BLOCK_M]`` fp32 tile in registers (``BLOCK_M``: M rounded up to a power of two; padded
rows and columns are held at 0 and their sums replaced by 1, so they stay 0 and never reach a real entry). One
launch does all the iterations: under ``torch.compile`` the plain-torch version is ~20 tiny kernels per call.

The backward stores nothing per iteration: for round ``r`` from the last to the first it recomputes the state
before round ``r`` from ``p0`` (``O(iters^2)`` rounds per token, cheap for ``M * M`` entries in registers) and
backpropagates through that round's two normalisations; for ``q = p / s`` with ``s`` the sum of p along a row
(or column), ``dp = (dq - sum(dq * q)) / s`` along the same row (column). Last, ``p0 = exp(l - rowmax) + floor``:
``dl = dp0 * e`` plus, on the row's maxima, ``-sum(dp0 * e)`` split evenly among them, as autograd does for amax.

The iteration count is a compile-time constant: Triton's interpreter cannot take a runtime scalar as a ``range``
bound with NumPy >= 2.4 (the inner loop's bound is the outer loop's variable, a plain int there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram.kernels.dispatch import kernel_output
from engram.kernels.sinkhorn.naive import SINKHORN_FLOOR

_TILE = 1024  # fp32 entries of a program's [BLOCK_T, BLOCK_M, BLOCK_M] tile


@triton.jit
def _tile(N, M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's token indices ``[BLOCK_T]`` (int64), row and column indices ``[BLOCK_M]``, and the masks
    of real entries ``[BLOCK_T, BLOCK_M, BLOCK_M]``, real rows and real columns (both ``[BLOCK_T, BLOCK_M]``)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_M)
    row_ok = (t < N)[:, None] & (i < M)[None, :]
    col_ok = (t < N)[:, None] & (j < M)[None, :]
    mask = row_ok[:, :, None] & (j < M)[None, None, :]
    return t, i, j, mask, row_ok, col_ok


@triton.jit
def _start(logits_ptr, t, i, j, mask, row_ok, stride_n, stride_i, stride_j, FLOOR: tl.constexpr):
    """``(l, rowmax, e, p0)``: the fp32 logits, their row maxima ``[BLOCK_T, BLOCK_M]``, ``e = exp(l - rowmax)``
    and ``p0 = e + floor``, the last two 0 off the matrix."""
    offsets = t[:, None, None] * stride_n + i[None, :, None] * stride_i + j[None, None, :] * stride_j
    l = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    row_max = tl.where(row_ok, tl.max(tl.where(mask, l, float("-inf")), axis=2), 0.0)
    e = tl.where(mask, tl.exp(l - row_max[:, :, None]), 0.0)
    p0 = tl.where(mask, e + FLOOR, 0.0)
    return l, row_max, e, p0


@triton.jit
def _round(p, row_ok, col_ok):
    """One Sinkhorn round: normalise the rows (sums along axis 2), then the columns (along axis 1)."""
    p = p / tl.where(row_ok, tl.sum(p, axis=2), 1.0)[:, :, None]
    return p / tl.where(col_ok, tl.sum(p, axis=1), 1.0)[:, None, :]


@triton.jit
def _sinkhorn_fwd_kernel(logits_ptr, out_ptr, N, stride_n, stride_i, stride_j,
                         M: tl.constexpr, ITERS: tl.constexpr, FLOOR: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """``BLOCK_T`` tokens: ``ITERS`` rounds from ``p0``, written to the contiguous fp32 ``[N, M, M]`` output."""
    t, i, j, mask, row_ok, col_ok = _tile(N, M, BLOCK_M, BLOCK_T)
    _, _, _, p = _start(logits_ptr, t, i, j, mask, row_ok, stride_n, stride_i, stride_j, FLOOR)
    for _ in range(ITERS):
        p = _round(p, row_ok, col_ok)
    tl.store(out_ptr + t[:, None, None] * (M * M) + i[None, :, None] * M + j[None, None, :], p, mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(grad_ptr, logits_ptr, grad_logits_ptr, N,
                         stride_gn, stride_gi, stride_gj, stride_n, stride_i, stride_j,
                         M: tl.constexpr, ITERS: tl.constexpr, FLOOR: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """``BLOCK_T`` tokens: the logits' gradient (contiguous ``[N, M, M]``, in the logits' dtype)."""
    t, i, j, mask, row_ok, col_ok = _tile(N, M, BLOCK_M, BLOCK_T)
    l, row_max, e, p0 = _start(logits_ptr, t, i, j, mask, row_ok, stride_n, stride_i, stride_j, FLOOR)
    grad_offsets = t[:, None, None] * stride_gn + i[None, :, None] * stride_gi + j[None, None, :] * stride_gj
    dp = tl.load(grad_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
    for k in range(ITERS):
        p = p0
        for _ in range(ITERS - 1 - k):
            p = _round(p, row_ok, col_ok)
        row_sum = tl.where(row_ok, tl.sum(p, axis=2), 1.0)
        y = p / row_sum[:, :, None]
        col_sum = tl.where(col_ok, tl.sum(y, axis=1), 1.0)
        z = y / col_sum[:, None, :]
        # The masks keep padded entries' gradients at 0 (they would otherwise pick up the real ones' sums).
        dy = tl.where(mask, (dp - tl.sum(dp * z, axis=1)[:, None, :]) / col_sum[:, None, :], 0.0)
        dp = tl.where(mask, (dy - tl.sum(dy * y, axis=2)[:, :, None]) / row_sum[:, :, None], 0.0)
    de = dp * e
    is_max = mask & (l == row_max[:, :, None])
    ties = tl.sum(is_max.to(tl.float32), axis=2)
    grad_max = -tl.sum(de, axis=2) / tl.where(row_ok, ties, 1.0)
    grad = de + tl.where(is_max, grad_max[:, :, None], 0.0)
    tl.store(grad_logits_ptr + t[:, None, None] * (M * M) + i[None, :, None] * M + j[None, None, :],
             grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _blocks(size: int, tokens: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_T)``: the padded matrix side and the tokens per program (a power of two, so few
    values compile)."""
    block_m = triton.next_power_of_2(size)
    return block_m, max(1, min(_TILE // (block_m * block_m), triton.next_power_of_2(tokens)))


def _matrices(x: torch.Tensor) -> torch.Tensor:
    """``[..., M, M]`` as ``[N, M, M]`` (a view when the strides allow, as for an expanded gradient)."""
    return x.reshape(-1, *x.shape[-2:])


def sinkhorn_fwd(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """``[..., M, M]`` logits, any float dtype and strides -> contiguous fp32 ``[..., M, M]``."""
    size = logits.shape[-1]
    out = kernel_output(logits.shape, torch.float32, logits.device)
    l = _matrices(logits)
    tokens = l.shape[0]
    if tokens:
        block_m, block_t = _blocks(size, tokens)
        _sinkhorn_fwd_kernel[(triton.cdiv(tokens, block_t),)](
            l, out, tokens, *l.stride(), M=size, ITERS=iters, FLOOR=SINKHORN_FLOOR, BLOCK_M=block_m,
            BLOCK_T=block_t, num_warps=4)
    return out


def sinkhorn_bwd(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The logits' gradient (contiguous, the logits' shape and dtype) for the output's fp32 gradient ``grad``,
    recomputing the forward from ``logits``."""
    size = logits.shape[-1]
    grad_logits = kernel_output(logits.shape, logits.dtype, logits.device)
    l, g = _matrices(logits), _matrices(grad)
    tokens = l.shape[0]
    if tokens:
        block_m, block_t = _blocks(size, tokens)
        _sinkhorn_bwd_kernel[(triton.cdiv(tokens, block_t),)](
            g, l, grad_logits, tokens, *g.stride(), *l.stride(), M=size, ITERS=iters, FLOOR=SINKHORN_FLOOR,
            BLOCK_M=block_m, BLOCK_T=block_t, num_warps=4)
    return grad_logits
