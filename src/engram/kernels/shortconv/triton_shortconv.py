"""Triton kernels for Engram's ShortConv (see ``naive.py`` for the specification).

Notation: ``x [B, T, M, D]`` with unit stride along D, channel ``c = m * D + d``, ``K`` taps, dilation ``L``,
window ``P = (K - 1) * L``. The normalised input is ``u[t, c] = cast(x * rstd[t, m] * w_n[c]) * mask[t]``
(``cast`` rounds to x's dtype, as the specification does), with ``u[t] = past[t + P]`` for ``-P <= t < 0``
(zeros without ``past``); ``z[t, c] = sum_k w[c, k] u[t - (K - 1 - k) L]``, rounded to x's dtype, and
``y = silu(z)``.

Every kernel works on ``[BLOCK_T, BLOCK_D]`` tiles of one branch ``m`` (a chunk of D) and one sequence ``b``;
the ``K`` shifted reads of the same tile hit the cache. Forward:
1. ``_rstd_kernel``, one program per token: the RMSNorm reciprocal roots ``rstd [B, T, M]`` (fp32).
2. ``_fwd_kernel``: ``y`` and the tail ``new_past`` (the last ``P`` values of ``u``; the part of it that
   comes from ``past`` when ``T < P`` is copied by torch).
Only ``x``, the weights, ``past``, the mask and ``rstd`` are kept for the backward, which recomputes ``u`` and
``z`` (K shifted loads of x) rather than saving ``z``.

Backward (``past`` is a constant: it gets no gradient, although it does enter the conv-weight gradient):
1. ``_bwd_conv_kernel``: ``gz = gy * silu'(z)`` (fp32, ``[B, T, C]``) and the conv-weight partial sums
   ``sum_t gz[t] u[t - (K - 1 - k) L]`` per (sequence, group of time blocks).
2. ``_bwd_norm_kernel``, one program per (sequence, group of time blocks, branch) with all of D in its tile:
   ``gu[t] = sum_k w[c, k] gz[t + (K - 1 - k) L]`` plus new_past's gradient, masked; with ``xh = x * rstd``,
   ``g_xh = gu * w_n``, the row dot ``sum_d g_xh * xh`` and ``dx = rstd * (g_xh - xh * dot / D)``, all in
   registers (no ``g_xh`` buffer, no second kernel), and the norm-weight partial sums ``sum_t gu * xh``.
Torch then adds the weight partial sums over their rows (deterministic, no atomics).

Loop bounds are compile-time constants (K, dilation, D, the time blocks per group are model constants or
powers of two): Triton's interpreter cannot take a runtime scalar as a ``range`` bound with NumPy >= 2.4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram.kernels.dispatch import kernel_output

_TILE = 2048  # elements of a [BLOCK_T, BLOCK_D] tile
_MAX_BLOCK_D = 128
_WEIGHT_GRAD_ROWS = 256  # at most about this many (sequence, time-block group) rows of weight partial sums
_CONV_BWD_MAX_BLOCK_D = 64
_CONV_BWD_WARPS = 16  # 32 x 64 tiles: ~100-130 registers a thread (K = 4), one program per SM
_NORM_BWD_TILE = 4096  # elements of _bwd_norm_kernel's [BLOCK_T, all of D] tile (more when D is larger)
_NORM_WEIGHT_GRAD_ROWS = 1024  # its norm-weight partial-sum rows: more programs, each over fewer time blocks


@triton.jit
def _normed(x_ptr, rstd_ptr, mask_ptr, past_ptr, nw, b, s, m, c, d, d_mask, T,
            stride_xb, stride_xt, stride_xm, stride_pb, stride_pc, stride_pt,
            M: tl.constexpr, P: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PAST: tl.constexpr):
    """``u`` at times ``s`` (``[BLOCK_T]``, int64, may be negative or past the end) for channels ``c``, fp32."""
    in_x = (s >= 0) & (s < T)
    tile_mask = in_x[:, None] & d_mask[None, :]
    xv = tl.load(x_ptr + b * stride_xb + s[:, None] * stride_xt + m * stride_xm + d[None, :], mask=tile_mask,
                 other=0.0)
    rstd = tl.load(rstd_ptr + (b * T + s) * M + m, mask=in_x, other=0.0)
    u = (xv.to(tl.float32) * rstd[:, None] * nw[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * T + s, mask=in_x, other=0) != 0
        u = tl.where(keep[:, None], u, 0.0)
    if HAS_PAST:
        in_past = (s < 0) & (s >= -P)
        pv = tl.load(past_ptr + b * stride_pb + c[None, :] * stride_pc + (s + P)[:, None] * stride_pt,
                     mask=in_past[:, None] & d_mask[None, :], other=0.0)
        u += pv.to(x_ptr.dtype.element_ty).to(tl.float32)
    return u


@triton.jit
def _rstd_kernel(x_ptr, rstd_ptr, T, stride_xb, stride_xt, stride_xm, eps,
                 M: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token: ``rstd = 1 / sqrt(mean_d x^2 + eps)`` of each branch."""
    n = tl.program_id(0).to(tl.int64)
    b = n // T
    t = n % T
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = m_mask[:, None] & (d < D)[None, :]
        xv = tl.load(x_ptr + b * stride_xb + t * stride_xt + m[:, None] * stride_xm + d[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        acc += tl.sum(xv * xv, axis=1)
    tl.store(rstd_ptr + n * M + m, tl.rsqrt(acc / D + eps), mask=m_mask)


@triton.jit
def _fwd_kernel(x_ptr, rstd_ptr, mask_ptr, past_ptr, nw_ptr, cw_ptr, y_ptr, new_past_ptr, T, NT,
                stride_xb, stride_xt, stride_xm, stride_pb, stride_pc, stride_pt,
                M: tl.constexpr, D: tl.constexpr, K: tl.constexpr, DIL: tl.constexpr, NDC: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_PAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One ``[BLOCK_T, BLOCK_D]`` tile of ``y`` (and of ``new_past`` where it overlaps the last P tokens)."""
    P: tl.constexpr = (K - 1) * DIL
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NT
    t = (pid % NT) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.program_id(1) // NDC
    d = (tl.program_id(1) % NDC) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    c = m * D + d
    nw = tl.load(nw_ptr + c, mask=d_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        u = _normed(x_ptr, rstd_ptr, mask_ptr, past_ptr, nw, b, t - (K - 1 - k) * DIL, m, c, d, d_mask, T,
                    stride_xb, stride_xt, stride_xm, stride_pb, stride_pc, stride_pt, M, P, HAS_MASK, HAS_PAST)
        w = tl.load(cw_ptr + c * K + k, mask=d_mask, other=0.0).to(tl.float32)
        acc += u * w[None, :]
        if k == K - 1:
            if P > 0:  # u of this tile: the tokens among the last P go to new_past [B, C, P]
                pos = t - (T - P)
                tail = (pos >= 0) & (t < T)
                tl.store(new_past_ptr + b * (M * D * P) + c[None, :] * P + pos[:, None],
                         u.to(new_past_ptr.dtype.element_ty), mask=tail[:, None] & d_mask[None, :])
    z = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    y = z * tl.sigmoid(z)
    tile_mask = (t < T)[:, None] & d_mask[None, :]
    tl.store(y_ptr + (b * T + t[:, None]) * (M * D) + c[None, :], y.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _bwd_conv_kernel(x_ptr, rstd_ptr, mask_ptr, past_ptr, nw_ptr, cw_ptr, grad_y_ptr, gz_ptr, partial_cw_ptr,
                     T, NG, stride_xb, stride_xt, stride_xm, stride_pb, stride_pc, stride_pt,
                     stride_gb, stride_gt, stride_gm,
                     M: tl.constexpr, D: tl.constexpr, K: tl.constexpr, DIL: tl.constexpr, NDC: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_PAST: tl.constexpr, TBLOCKS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``gz = gy * silu'(z)`` for TBLOCKS time blocks of one sequence, and their conv-weight partial sums.

    Each tap's shifted ``u`` is computed once per tile and kept in registers (in x's dtype, which holds it
    exactly) for both ``z`` and the weight-gradient products; those products are summed elementwise into one
    ``[BLOCK_T, BLOCK_D]`` accumulator per tap and reduced over time once, at the end of the program."""
    P: tl.constexpr = (K - 1) * DIL
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NG
    group = pid % NG
    m = tl.program_id(1) // NDC
    d = (tl.program_id(1) % NDC) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    c = m * D + d
    nw = tl.load(nw_ptr + c, mask=d_mask, other=0.0).to(tl.float32)
    ws = ()
    accs = ()
    for k in tl.static_range(K):
        ws = ws + (tl.load(cw_ptr + c * K + k, mask=d_mask, other=0.0).to(tl.float32),)
        accs = accs + (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),)
    for i in range(TBLOCKS):
        t = (group * TBLOCKS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        tile_mask = (t < T)[:, None] & d_mask[None, :]
        z = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        us = ()
        for k in tl.static_range(K):
            u = _normed(x_ptr, rstd_ptr, mask_ptr, past_ptr, nw, b, t - (K - 1 - k) * DIL, m, c, d, d_mask, T,
                        stride_xb, stride_xt, stride_xm, stride_pb, stride_pc, stride_pt, M, P, HAS_MASK, HAS_PAST)
            us = us + (u.to(x_ptr.dtype.element_ty),)
            z += u * ws[k][None, :]
        z = z.to(x_ptr.dtype.element_ty).to(tl.float32)
        gy = tl.load(grad_y_ptr + b * stride_gb + t[:, None] * stride_gt + m * stride_gm + d[None, :],
                     mask=tile_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gz = tl.where(tile_mask, gy * sig * (1.0 + z * (1.0 - sig)), 0.0)
        tl.store(gz_ptr + (b * T + t[:, None]) * (M * D) + c[None, :], gz, mask=tile_mask)
        new_accs = ()
        for k in tl.static_range(K):  # the taps' weight-gradient terms
            new_accs = new_accs + (accs[k] + gz * us[k].to(tl.float32),)
        accs = new_accs
    for k in tl.static_range(K):
        tl.store(partial_cw_ptr + pid * (M * D * K) + c * K + k, tl.sum(accs[k], axis=0), mask=d_mask)


@triton.jit
def _bwd_norm_kernel(x_ptr, rstd_ptr, mask_ptr, nw_ptr, cw_ptr, gz_ptr, grad_past_ptr, grad_x_ptr,
                     partial_nw_ptr, T, NG, stride_xb, stride_xt, stride_xm, stride_qb, stride_qc, stride_qt,
                     M: tl.constexpr, D: tl.constexpr, K: tl.constexpr, DIL: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_GRAD_PAST: tl.constexpr, TBLOCKS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dx`` for TBLOCKS time blocks of one sequence and one branch (all of D in one tile, so the row dot
    ``sum_d g_xh * xh`` is complete in the program and ``g_xh`` never leaves registers), and their norm-weight
    partial sums."""
    P: tl.constexpr = (K - 1) * DIL
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NG
    group = pid % NG
    m = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    c = m * D + d
    nw = tl.load(nw_ptr + c, mask=d_mask, other=0.0).to(tl.float32)
    ws = ()
    for k in tl.static_range(K):
        ws = ws + (tl.load(cw_ptr + c * K + k, mask=d_mask, other=0.0).to(tl.float32),)
    acc_nw = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i in range(TBLOCKS):
        t = (group * TBLOCKS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_x = t < T
        tile_mask = in_x[:, None] & d_mask[None, :]
        gu = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            later = t + (K - 1 - k) * DIL
            g = tl.load(gz_ptr + (b * T + later[:, None]) * (M * D) + c[None, :],
                        mask=(later < T)[:, None] & d_mask[None, :], other=0.0)
            gu += g * ws[k][None, :]
        if HAS_GRAD_PAST:
            pos = t - (T - P)
            tail = (pos >= 0) & in_x
            gu += tl.load(grad_past_ptr + b * stride_qb + c[None, :] * stride_qc + pos[:, None] * stride_qt,
                          mask=tail[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * T + t, mask=in_x, other=0) != 0
            gu = tl.where(keep[:, None], gu, 0.0)
        xv = tl.load(x_ptr + b * stride_xb + t[:, None] * stride_xt + m * stride_xm + d[None, :], mask=tile_mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + (b * T + t) * M + m, mask=in_x, other=0.0)
        xh = xv * rstd[:, None]
        gxh = gu * nw[None, :]
        acc_nw += gu * xh
        dot = tl.sum(gxh * xh, axis=1)
        grad_x = rstd[:, None] * (gxh - xh * (dot / D)[:, None])
        tl.store(grad_x_ptr + (b * T + t[:, None]) * (M * D) + c[None, :],
                 grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(partial_nw_ptr + pid * (M * D) + c, tl.sum(acc_nw, axis=0), mask=d_mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dim (a copy only if needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(length: int, dim: int, max_block_d: int = _MAX_BLOCK_D, tile: int = _TILE) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, number of D chunks)``."""
    block_d = min(triton.next_power_of_2(dim), max_block_d)
    block_t = max(1, min(triton.next_power_of_2(length), tile // block_d))
    return block_t, block_d, triton.cdiv(dim, block_d)


def _conv_bwd_blocks(length: int, dim: int) -> tuple[int, int, int]:
    """``_bwd_conv_kernel``'s tiles: taller than the forward's (32 x 64 for a large D), so the K shifted windows
    of a tile overlap more (a 9-step window re-reads 41/32 rows per tile instead of 25/16)."""
    return _blocks(length, dim, _CONV_BWD_MAX_BLOCK_D)


def _norm_bwd_blocks(length: int, dim: int) -> tuple[int, int]:
    """``_bwd_norm_kernel``'s tiles ``(BLOCK_T, BLOCK_D)``: all of D (a power of two) in one tile."""
    block_d = triton.next_power_of_2(dim)
    return max(1, min(triton.next_power_of_2(length), _NORM_BWD_TILE // block_d)), block_d


def _norm_bwd_warps(block_t: int, block_d: int) -> int:
    return min(16, max(4, block_t * block_d // 512))


def _groups(batch: int, num_blocks: int, rows: int = _WEIGHT_GRAD_ROWS) -> tuple[int, int]:
    """``(time blocks per group, groups per sequence)``: a power of two, so few compile-time loop lengths."""
    per_group = triton.next_power_of_2(max(1, triton.cdiv(batch * num_blocks, rows)))
    return per_group, triton.cdiv(num_blocks, per_group)


def _past_args(past: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    if past is None:
        return like, 0, 0, 0
    return past, past.stride(0), past.stride(1), past.stride(2)


def _mask_arg(token_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if token_mask is None else token_mask.to(torch.int8).contiguous()


def short_conv_fwd(x: torch.Tensor, norm_weight: torch.Tensor, conv_weight: torch.Tensor,
                   past: torch.Tensor | None, token_mask: torch.Tensor | None, dilation: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [B, T, M, D] in x's dtype, new_past [B, M * D, P] in x's dtype, rstd [B, T, M] fp32)``."""
    batch, length, branches, dim = x.shape
    channels, kernel_size = branches * dim, conv_weight.shape[-1]
    left_pad = (kernel_size - 1) * dilation
    x = _rows(x)
    device = x.device
    y = kernel_output((batch, length, branches, dim), x.dtype, device)
    rstd = kernel_output((batch, length, branches), torch.float32, device)
    new_past = kernel_output((batch, channels, left_pad), x.dtype, device)
    head = max(0, left_pad - length)  # new_past positions still inside past
    if head:
        if past is None:
            new_past[..., :head].zero_()
        else:
            new_past[..., :head].copy_(past[..., length:])
    if batch == 0 or length == 0 or channels == 0:
        return y, new_past, rstd
    nw = norm_weight.contiguous()
    cw = conv_weight.reshape(channels, kernel_size).to(x.dtype).contiguous()
    past_arg, *past_strides = _past_args(past, x)
    mask_arg = _mask_arg(token_mask, x)
    block_m = triton.next_power_of_2(branches)
    _rstd_kernel[(batch * length,)](
        x, rstd, length, x.stride(0), x.stride(1), x.stride(2), eps,
        M=branches, D=dim, BLOCK_M=block_m, BLOCK_D=min(triton.next_power_of_2(dim), max(16, 4096 // block_m)),
        num_warps=4)
    block_t, block_d, chunks = _blocks(length, dim)
    num_blocks = triton.cdiv(length, block_t)
    _fwd_kernel[(batch * num_blocks, branches * chunks)](
        x, rstd, mask_arg, past_arg, nw, cw, y, new_past, length, num_blocks,
        x.stride(0), x.stride(1), x.stride(2), *past_strides,
        M=branches, D=dim, K=kernel_size, DIL=dilation, NDC=chunks, HAS_MASK=token_mask is not None,
        HAS_PAST=past is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return y, new_past, rstd


def short_conv_bwd(grad_y: torch.Tensor, grad_new_past: torch.Tensor | None, x: torch.Tensor,
                   norm_weight: torch.Tensor, conv_weight: torch.Tensor, past: torch.Tensor | None,
                   token_mask: torch.Tensor | None, rstd: torch.Tensor, dilation: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, norm_weight and conv_weight, each in its input's shape and dtype (past gets none)."""
    batch, length, branches, dim = x.shape
    channels, kernel_size = branches * dim, conv_weight.shape[-1]
    left_pad = (kernel_size - 1) * dilation
    x, grad_y = _rows(x), _rows(grad_y)
    device = x.device
    grad_x = kernel_output((batch, length, branches, dim), x.dtype, device)
    if batch == 0 or length == 0 or channels == 0:
        return grad_x, torch.zeros_like(norm_weight), torch.zeros_like(conv_weight)
    nw = norm_weight.contiguous()
    cw = conv_weight.reshape(channels, kernel_size).to(x.dtype).contiguous()
    past_arg, *past_strides = _past_args(past, x)
    mask_arg = _mask_arg(token_mask, x)
    block_t, block_d, chunks = _conv_bwd_blocks(length, dim)
    num_blocks = triton.cdiv(length, block_t)
    per_group, groups = _groups(batch, num_blocks)
    gz = kernel_output((batch, length, channels), torch.float32, device)
    partial_cw = kernel_output((batch * groups, channels, kernel_size), torch.float32, device)
    _bwd_conv_kernel[(batch * groups, branches * chunks)](
        x, rstd, mask_arg, past_arg, nw, cw, grad_y, gz, partial_cw, length, groups,
        x.stride(0), x.stride(1), x.stride(2), *past_strides, grad_y.stride(0), grad_y.stride(1),
        grad_y.stride(2), M=branches, D=dim, K=kernel_size, DIL=dilation, NDC=chunks,
        HAS_MASK=token_mask is not None, HAS_PAST=past is not None, TBLOCKS=per_group, BLOCK_T=block_t,
        BLOCK_D=block_d, num_warps=_CONV_BWD_WARPS)
    has_grad_past = grad_new_past is not None and left_pad > 0
    grad_past_arg, *grad_past_strides = _past_args(grad_new_past if has_grad_past else None, x)
    block_t, block_d = _norm_bwd_blocks(length, dim)
    num_blocks = triton.cdiv(length, block_t)
    per_group, groups = _groups(batch, num_blocks, _NORM_WEIGHT_GRAD_ROWS)
    partial_nw = kernel_output((batch * groups, channels), torch.float32, device)
    _bwd_norm_kernel[(batch * groups, branches)](
        x, rstd, mask_arg, nw, cw, gz, grad_past_arg, grad_x, partial_nw, length, groups,
        x.stride(0), x.stride(1), x.stride(2), *grad_past_strides, M=branches, D=dim, K=kernel_size,
        DIL=dilation, HAS_MASK=token_mask is not None, HAS_GRAD_PAST=has_grad_past, TBLOCKS=per_group,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_norm_bwd_warps(block_t, block_d))
    grad_cw = partial_cw.sum(0).reshape(conv_weight.shape).to(conv_weight.dtype)
    return grad_x, partial_nw.sum(0).reshape(norm_weight.shape).to(norm_weight.dtype), grad_cw
