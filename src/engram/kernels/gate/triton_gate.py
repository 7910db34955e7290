"""Triton kernels for the Engram gate (see ``naive.py`` for the specification).

Tensors are seen as ``[N, M, D]`` rows with ``N = B * T`` tokens and unit stride along D; each program works on
a ``[BLOCK_M, BLOCK_D]`` tile (every branch, one chunk of D). The forward saves per ``(token, branch)`` only the
two RMSNorm reciprocal roots and the score ``s`` (the ``[N, M]`` stats are contiguous, being ours); the backward
rebuilds the normalised rows from them in two kernels: one per token for ``ds`` and the value's gradient
(reductions over D), then one per (token block, D chunk) for the keys' and hidden's gradients and the weights'
partial sums, which torch adds over blocks (deterministic, no atomics).

Loop bounds are compile-time constants (M and D are model constants): Triton's interpreter cannot take a
runtime scalar as a ``range`` bound with NumPy >= 2.4.

Backward, with ``y = x * rstd`` the normalised rows, ``n = y * w`` and ``c = ds / sqrt(D)``: since
``s = <n_k, n_q> / sqrt(D)``, the RMSNorm backward term ``mean(dy * y)`` collapses to ``c * s / sqrt(D)``, so
    dx_k = rstd_k * c * (w_k * n_q - y_k * s / sqrt(D))      dw_k = sum over tokens of c * n_q * y_k
and the same with k and q swapped; ``ds = dg * g (1 - g) * [|s| >= floor] / (2 sqrt(|s|))``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engram.kernels.dispatch import kernel_output
from engram.kernels.gate.naive import GATE_FLOOR

_TILE = 4096  # elements of the [BLOCK_M, BLOCK_D] tile of the reducing kernels
_WEIGHT_TILE = 1024  # smaller: the weight-gradient kernel keeps two accumulators and ~8 tiles live
_WEIGHT_GRAD_BLOCKS = 256  # at most this many token blocks (rows of the partial-sum buffer) in the weight grads


@triton.jit
def _gate_fwd_kernel(keys_ptr, hidden_ptr, value_ptr, wk_ptr, wq_ptr,
                     gated_ptr, gates_ptr, rstd_k_ptr, rstd_q_ptr, score_ptr,
                     stride_kn, stride_km, stride_hn, stride_hm, stride_vn,
                     key_eps, query_eps, sqrt_dim,
                     M: tl.constexpr, D: tl.constexpr, FLOOR: tl.constexpr, ZERO_POSITIVE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token: the score and gate of every branch (first pass over D), then the gated value (second)."""
    n = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    sum_kk = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_qq = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_kq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = m_mask[:, None] & (d < D)[None, :]
        xk = tl.load(keys_ptr + n * stride_kn + m[:, None] * stride_km + d[None, :], mask=mask, other=0.0)
        xq = tl.load(hidden_ptr + n * stride_hn + m[:, None] * stride_hm + d[None, :], mask=mask, other=0.0)
        wk = tl.load(wk_ptr + m[:, None] * D + d[None, :], mask=mask, other=0.0)
        wq = tl.load(wq_ptr + m[:, None] * D + d[None, :], mask=mask, other=0.0)
        xk = xk.to(tl.float32)
        xq = xq.to(tl.float32)
        sum_kk += tl.sum(xk * xk, axis=1)
        sum_qq += tl.sum(xq * xq, axis=1)
        sum_kq += tl.sum(xk * wk.to(tl.float32) * xq * wq.to(tl.float32), axis=1)
    rstd_k = tl.rsqrt(sum_kk / D + key_eps)
    rstd_q = tl.rsqrt(sum_qq / D + query_eps)
    score = sum_kq * rstd_k * rstd_q / sqrt_dim
    root = tl.sqrt(tl.maximum(tl.abs(score), FLOOR))
    if ZERO_POSITIVE:  # sign(0) = +1 (DeepSeek-V4.1's engines)
        gate = tl.sigmoid(tl.where(score < 0, -root, root))
    else:
        gate = tl.sigmoid(tl.where(score > 0, root, tl.where(score < 0, -root, 0.0)))
    tl.store(gates_ptr + n * M + m, gate, mask=m_mask)
    tl.store(rstd_k_ptr + n * M + m, rstd_k, mask=m_mask)
    tl.store(rstd_q_ptr + n * M + m, rstd_q, mask=m_mask)
    tl.store(score_ptr + n * M + m, score, mask=m_mask)
    # The specification multiplies in value's dtype: round the gate to it first.
    gate = gate.to(gated_ptr.dtype.element_ty).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = m_mask[:, None] & (d < D)[None, :]
        v = tl.load(value_ptr + n * stride_vn + d, mask=d < D, other=0.0).to(tl.float32)
        gated = gate[:, None] * v[None, :]
        tl.store(gated_ptr + n * M * D + m[:, None] * D + d[None, :], gated.to(gated_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _gate_bwd_score_kernel(grad_gated_ptr, grad_gates_ptr, value_ptr, gates_ptr, score_ptr,
                           grad_value_ptr, grad_score_ptr,
                           stride_gn, stride_gm, stride_vn,
                           M: tl.constexpr, D: tl.constexpr, FLOOR: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per token: the value's gradient and the score's gradient ``ds``."""
    n = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    gate = tl.load(gates_ptr + n * M + m, mask=m_mask, other=0.0)
    gate_cast = gate.to(grad_value_ptr.dtype.element_ty).to(tl.float32)
    grad_gate = tl.load(grad_gates_ptr + n * M + m, mask=m_mask, other=0.0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = m_mask[:, None] & (d < D)[None, :]
        grad_gated = tl.load(grad_gated_ptr + n * stride_gn + m[:, None] * stride_gm + d[None, :], mask=mask,
                             other=0.0).to(tl.float32)
        v = tl.load(value_ptr + n * stride_vn + d, mask=d < D, other=0.0).to(tl.float32)
        grad_gate += tl.sum(grad_gated * v[None, :], axis=1)
        grad_v = tl.sum(grad_gated * gate_cast[:, None], axis=0)
        tl.store(grad_value_ptr + n * D + d, grad_v.to(grad_value_ptr.dtype.element_ty), mask=d < D)
    score = tl.load(score_ptr + n * M + m, mask=m_mask, other=0.0)
    magnitude = tl.abs(score)
    # Below the floor the clamp makes the gate constant in s (autograd's clamp_min passes the boundary).
    grad_root = tl.where(magnitude >= FLOOR, 0.5 / tl.sqrt(tl.maximum(magnitude, FLOOR)), 0.0)
    grad_score = grad_gate * gate * (1.0 - gate) * grad_root
    tl.store(grad_score_ptr + n * M + m, grad_score, mask=m_mask)


@triton.jit
def _gate_bwd_input_kernel(keys_ptr, hidden_ptr, wk_ptr, wq_ptr, rstd_k_ptr, rstd_q_ptr, score_ptr,
                           grad_score_ptr, grad_keys_ptr, grad_hidden_ptr, partial_wk_ptr, partial_wq_ptr,
                           stride_kn, stride_km, stride_hn, stride_hm, N, sqrt_dim, M: tl.constexpr,
                           D: tl.constexpr, TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of tokens x one chunk of D: the keys' and hidden's gradients, partial weight gradients."""
    block = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = m < M
    mask = m_mask[:, None] & (d < D)[None, :]
    wk = tl.load(wk_ptr + m[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    wq = tl.load(wq_ptr + m[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    acc_wk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_wq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, TOKENS):
        n = block.to(tl.int64) * TOKENS + i
        row_mask = m_mask & (n < N)
        tile_mask = mask & (n < N)
        rstd_k = tl.load(rstd_k_ptr + n * M + m, mask=row_mask, other=0.0)
        rstd_q = tl.load(rstd_q_ptr + n * M + m, mask=row_mask, other=0.0)
        score = tl.load(score_ptr + n * M + m, mask=row_mask, other=0.0)
        c = tl.load(grad_score_ptr + n * M + m, mask=row_mask, other=0.0) / sqrt_dim
        xk = tl.load(keys_ptr + n * stride_kn + m[:, None] * stride_km + d[None, :], mask=tile_mask, other=0.0)
        xq = tl.load(hidden_ptr + n * stride_hn + m[:, None] * stride_hm + d[None, :], mask=tile_mask, other=0.0)
        yk = xk.to(tl.float32) * rstd_k[:, None]
        yq = xq.to(tl.float32) * rstd_q[:, None]
        nk = yk * wk
        nq = yq * wq
        mean_term = (score / sqrt_dim)[:, None]
        grad_k = (rstd_k * c)[:, None] * (wk * nq - yk * mean_term)
        grad_q = (rstd_q * c)[:, None] * (wq * nk - yq * mean_term)
        tl.store(grad_keys_ptr + n * M * D + m[:, None] * D + d[None, :],
                 grad_k.to(grad_keys_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(grad_hidden_ptr + n * M * D + m[:, None] * D + d[None, :],
                 grad_q.to(grad_hidden_ptr.dtype.element_ty), mask=tile_mask)
        acc_wk += c[:, None] * nq * yk
        acc_wq += c[:, None] * nk * yq
    offsets = block.to(tl.int64) * M * D + m[:, None] * D + d[None, :]
    tl.store(partial_wk_ptr + offsets, acc_wk, mask=mask)
    tl.store(partial_wq_ptr + offsets, acc_wq, mask=mask)


def _rows(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """``x`` reshaped to ``shape`` with unit stride along the last dim (a view when possible)."""
    x = x.reshape(shape)
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(branches: int, dim: int, tile: int) -> tuple[int, int]:
    block_m = triton.next_power_of_2(branches)
    return block_m, min(triton.next_power_of_2(dim), max(16, tile // block_m))


def gate_fwd(keys: torch.Tensor, hidden: torch.Tensor, value: torch.Tensor, key_norm_weight: torch.Tensor,
             query_norm_weight: torch.Tensor, key_eps: float, query_eps: float, zero_positive: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, T, M, D]`` keys and hidden, ``[B, T, D]`` value -> ``(gated [B, T, M, D], gates, rstd_k, rstd_q,
    score)``, the last four ``[B, T, M]`` fp32; ``zero_positive`` as in the naive gate."""
    *_, branches, dim = keys.shape
    tokens = keys.numel() // (branches * dim)
    k, h, v = _rows(keys, tokens, branches, dim), _rows(hidden, tokens, branches, dim), _rows(value, tokens, dim)
    gated = kernel_output(keys.shape, value.dtype, keys.device)
    gates, rstd_k, rstd_q, score = (kernel_output(keys.shape[:-1], torch.float32, keys.device) for _ in range(4))
    if tokens:
        block_m, block_d = _blocks(branches, dim, _TILE)
        _gate_fwd_kernel[(tokens,)](
            k, h, v, key_norm_weight.contiguous(), query_norm_weight.contiguous(),
            gated, gates, rstd_k, rstd_q, score,
            k.stride(0), k.stride(1), h.stride(0), h.stride(1), v.stride(0), key_eps, query_eps, math.sqrt(dim),
            M=branches, D=dim, FLOOR=GATE_FLOOR, ZERO_POSITIVE=zero_positive, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=8)
    return gated, gates, rstd_k, rstd_q, score


def gate_bwd(grad_gated: torch.Tensor, grad_gates: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor,
             value: torch.Tensor, key_norm_weight: torch.Tensor, query_norm_weight: torch.Tensor,
             gates: torch.Tensor, rstd_k: torch.Tensor, rstd_q: torch.Tensor, score: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of keys, hidden, value and the two norm weights, each in its input's shape and dtype."""
    *_, branches, dim = keys.shape
    tokens = keys.numel() // (branches * dim)
    device = keys.device
    k, h, v = _rows(keys, tokens, branches, dim), _rows(hidden, tokens, branches, dim), _rows(value, tokens, dim)
    wk, wq = key_norm_weight.contiguous(), query_norm_weight.contiguous()
    gg = _rows(grad_gated, tokens, branches, dim)
    grad_keys = kernel_output(keys.shape, keys.dtype, device)
    grad_hidden = kernel_output(hidden.shape, hidden.dtype, device)
    grad_value = kernel_output(value.shape, value.dtype, device)
    # A power of two, so that the token-loop length (a compile-time constant) takes few values.
    tokens_per_program = triton.next_power_of_2(max(1, triton.cdiv(tokens, _WEIGHT_GRAD_BLOCKS)))
    num_blocks = triton.cdiv(tokens, tokens_per_program)
    partial = kernel_output((2, num_blocks, branches, dim), torch.float32, device)
    if tokens:
        grad_score = kernel_output((tokens, branches), torch.float32, device)
        block_m, block_d = _blocks(branches, dim, _TILE)
        _gate_bwd_score_kernel[(tokens,)](
            gg, grad_gates.contiguous(), v, gates, score, grad_value, grad_score,
            gg.stride(0), gg.stride(1), v.stride(0),
            M=branches, D=dim, FLOOR=GATE_FLOOR, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8)
        block_m, block_d = _blocks(branches, dim, _WEIGHT_TILE)
        _gate_bwd_input_kernel[(num_blocks, triton.cdiv(dim, block_d))](
            k, h, wk, wq, rstd_k, rstd_q, score, grad_score,
            grad_keys, grad_hidden, partial[0], partial[1],
            k.stride(0), k.stride(1), h.stride(0), h.stride(1), tokens, math.sqrt(dim),
            M=branches, D=dim, TOKENS=tokens_per_program, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return (grad_keys, grad_hidden, grad_value, partial[0].sum(0).to(key_norm_weight.dtype),
            partial[1].sum(0).to(query_norm_weight.dtype))
