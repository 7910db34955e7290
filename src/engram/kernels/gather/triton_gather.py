"""Triton kernels of the multi-head gather: a row-copy forward and two backwards.

The deterministic backward sorts the (row, gradient) pairs by row and sums each row's segment in a fixed
order, one program per unique row. The atomic backward adds fp32 gradients into a buffer with
``tl.atomic_add``: faster (no per-segment programs, and no sort at all for a dense gradient) but the order of
the additions, hence the rounding, changes from run to run.

Offsets into the table and the gradients are computed in int64: tables exceed 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Widest tile along D; wider head dims loop over D in chunks of this.
MAX_BLOCK_D = 256
# Elements per tile (tokens or gradient vectors times BLOCK_D).
TILE = 2048


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), MAX_BLOCK_D)


@triton.jit
def _gather_fwd_kernel(weight_ptr, rows_ptr, out_ptr, num_tokens, H: tl.constexpr, D: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    cols = tl.arange(0, BLOCK_D)
    for h in tl.static_range(H):
        row = tl.load(rows_ptr + tok * H + h, mask=tok_mask, other=0).to(tl.int64)
        for d0 in tl.static_range(0, D, BLOCK_D):
            c = d0 + cols
            mask = tok_mask[:, None] & (c < D)[None, :]
            vals = tl.load(weight_ptr + row[:, None] * D + c[None, :], mask=mask)
            tl.store(out_ptr + tok[:, None] * (H * D) + (h * D) + c[None, :], vals, mask=mask)


@triton.jit
def _segment_sum_kernel(grad_ptr, order_ptr, seg_start_ptr, out_ptr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = c < D
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # A while loop: Triton's interpreter cannot take a loaded scalar as a range() bound (numpy >= 2).
    i = start
    while i < end:
        j = i + tl.arange(0, BLOCK_S)
        j_mask = j < end
        src = tl.load(order_ptr + j, mask=j_mask, other=0)
        g = tl.load(grad_ptr + src[:, None] * D + c[None, :], mask=j_mask[:, None] & c_mask[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
        i += BLOCK_S
    tl.store(out_ptr + seg * D + c, acc, mask=c_mask)


@triton.jit
def _scatter_add_kernel(grad_ptr, dst_rows_ptr, out_ptr, num_pairs, D: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < num_pairs
    dst = tl.load(dst_rows_ptr + p, mask=p_mask, other=0)
    cols = tl.arange(0, BLOCK_D)
    for d0 in tl.static_range(0, D, BLOCK_D):
        c = d0 + cols
        mask = p_mask[:, None] & (c < D)[None, :]
        g = tl.load(grad_ptr + p[:, None] * D + c[None, :], mask=mask, other=0.0)
        tl.atomic_add(out_ptr + dst[:, None] * D + c[None, :], g.to(tl.float32), mask=mask, sem="relaxed")


def gather_fwd(weight: Tensor, flat_rows: Tensor) -> Tensor:
    """``[R, D]`` table, ``[..., H]`` flat rows -> ``[..., H * D]`` (a copy, in ``weight``'s dtype)."""
    weight = weight.contiguous()
    num_heads, dim = flat_rows.shape[-1], weight.shape[1]
    rows = flat_rows.reshape(-1, num_heads).contiguous()
    out = torch.empty(rows.shape[0], num_heads * dim, dtype=weight.dtype, device=weight.device)
    if out.numel():
        block_d = _block_d(dim)
        block_t = max(1, TILE // block_d)
        grid = (triton.cdiv(rows.shape[0], block_t),)
        _gather_fwd_kernel[grid](weight, rows, out, rows.shape[0], H=num_heads, D=dim, BLOCK_T=block_t,
                                 BLOCK_D=block_d)
    return out.view(*flat_rows.shape[:-1], num_heads * dim)


def _pairs(grad: Tensor, flat_rows: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., H * D]`` gradient, ``[..., H]`` rows -> ``[P]`` rows and ``[P, D]`` vectors, ``P = tokens * H``."""
    rows = flat_rows.reshape(-1)
    return rows, grad.reshape(rows.shape[0], grad.shape[-1] // flat_rows.shape[-1]).contiguous()


def _segment_sums(vectors: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Unique ``rows`` (ascending) and the fp32 sum of each one's ``vectors``, added in their stable sorted order."""
    sorted_rows, order = torch.sort(rows, stable=True)
    unique_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    num_unique, dim = unique_rows.shape[0], vectors.shape[1]
    sums = torch.empty(num_unique, dim, dtype=torch.float32, device=vectors.device)
    if num_unique:
        seg_start = torch.zeros(num_unique + 1, dtype=torch.int64, device=vectors.device)
        torch.cumsum(counts, dim=0, out=seg_start[1:])
        block_d = _block_d(dim)
        # BLOCK_S depends on D alone: the summation tree, hence the rounding, is fixed for a given D.
        block_s = max(1, min(16, TILE // block_d))
        grid = (num_unique, triton.cdiv(dim, block_d))
        _segment_sum_kernel[grid](vectors, order, seg_start, sums, D=dim, BLOCK_S=block_s, BLOCK_D=block_d)
    return unique_rows, sums


def _scatter_add(vectors: Tensor, dst_rows: Tensor, num_dst: int) -> Tensor:
    """fp32 ``[num_dst, D]`` buffer with ``vectors[p]`` added into row ``dst_rows[p]`` (atomic, unordered)."""
    num_pairs, dim = vectors.shape
    out = torch.zeros(num_dst, dim, dtype=torch.float32, device=vectors.device)
    if num_pairs:
        block_d = _block_d(dim)
        block_p = max(1, TILE // block_d)
        _scatter_add_kernel[(triton.cdiv(num_pairs, block_p),)](vectors, dst_rows, out, num_pairs, D=dim,
                                                               BLOCK_P=block_p, BLOCK_D=block_d)
    return out


# The kernels return fp32 sums and torch rounds them to the gradient's dtype (round to nearest even, as
# F.embedding's backward); Triton's interpreter truncates in fp32 -> bf16 casts, so a kernel-side cast would
# differ between the CPU tests and the GPU.


def gather_bwd_sparse(grad: Tensor, flat_rows: Tensor, deterministic: bool) -> tuple[Tensor, Tensor]:
    """``[..., H * D]`` gradient -> the rows read ``[U]`` (unique, ascending) and their summed gradients ``[U, D]``."""
    rows, vectors = _pairs(grad, flat_rows)
    if deterministic:
        unique_rows, sums = _segment_sums(vectors, rows)
    else:
        unique_rows, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        sums = _scatter_add(vectors, inverse, unique_rows.shape[0])
    return unique_rows, sums.to(grad.dtype)


def gather_bwd_dense(grad: Tensor, flat_rows: Tensor, num_rows: int, deterministic: bool) -> Tensor:
    """``[..., H * D]`` gradient -> the dense ``[num_rows, D]`` gradient of the table."""
    if not deterministic:
        rows, vectors = _pairs(grad, flat_rows)
        return _scatter_add(vectors, rows, num_rows).to(grad.dtype)
    unique_rows, values = gather_bwd_sparse(grad, flat_rows, deterministic=True)
    out = torch.zeros(num_rows, values.shape[1], dtype=grad.dtype, device=grad.device)
    return out.index_copy_(0, unique_rows, values)
