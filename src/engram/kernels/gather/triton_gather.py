"""Triton kernels of the multi-head gather: a row-copy forward and two backwards.

The deterministic backward sorts the (row, gradient) pairs by row and sums each row's segment in a fixed
order, a block of unique rows per program. The atomic backward adds fp32 gradients into a buffer with
``tl.atomic_add``: faster (no per-segment programs, and no sort at all for a dense gradient) but the order of
the additions, hence the rounding, changes from run to run.

Offsets into the table and the gradients are computed in int64: tables exceed 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from engram.kernels.dispatch import kernel_output

# Widest tile along D; wider head dims loop over D in chunks of this.
MAX_BLOCK_D = 256
# Elements per tile (tokens or gradient vectors times BLOCK_D).
TILE = 2048
# Elements per tile of the segment-sum kernel (segments x gradients per segment x BLOCK_D).
SEGMENT_TILE = 4096


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
def _segment_sum_kernel(grad_ptr, order_ptr, seg_start_ptr, out_ptr, num_segs, D: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # BLOCK_G segments per program, side by side: each step loads the next BLOCK_S sorted gradients of every
    # segment ([BLOCK_G, BLOCK_S, BLOCK_D]), sums them along S and adds that to the segment's accumulator, so
    # a segment's summation order depends on its own length and BLOCK_S alone, never on its neighbours.
    seg = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    seg_mask = seg < num_segs
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = c < D
    start = tl.load(seg_start_ptr + seg, mask=seg_mask, other=0)
    end = tl.load(seg_start_ptr + seg + 1, mask=seg_mask, other=0)
    longest = tl.max(end - start, axis=0)
    s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    # A while loop: Triton's interpreter cannot take a loaded scalar as a range() bound (numpy >= 2).
    k = longest * 0
    while k < longest:
        j = start[:, None] + k + s[None, :]
        j_mask = j < end[:, None]
        src = tl.load(order_ptr + j, mask=j_mask, other=0)
        g = tl.load(grad_ptr + src[:, :, None] * D + c[None, None, :],
                    mask=j_mask[:, :, None] & c_mask[None, None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=1)
        k += BLOCK_S
    tl.store(out_ptr + seg[:, None] * D + c[None, :], acc, mask=seg_mask[:, None] & c_mask[None, :])


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
    out = kernel_output((rows.shape[0], num_heads * dim), weight.dtype, weight.device)
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


def _segment_params(dim: int) -> dict:
    """Tile of the segment-sum kernel; BLOCK_S depends on D alone, so the summation tree (hence the rounding)
    is fixed for a given D."""
    block_d = _block_d(dim)
    block_s = 4
    block_g = max(1, min(64, SEGMENT_TILE // (block_s * block_d)))
    return dict(BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_D=block_d,
                num_warps=8 if block_g * block_s * block_d >= 4096 else 4)


def _segment_sums(vectors: Tensor, rows: Tensor, num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Unique ``rows`` (ascending) and the fp32 sum of each one's ``vectors``, added in their stable sorted order.

    ``num_rows`` (rows lie in ``[0, num_rows)``), when known and at most 2**31, lets the sort run on int32 keys:
    a radix sort of half the key bits, and the same stable order as on the int64 rows.
    """
    if num_rows is not None and num_rows <= 2**31 and rows.dtype == torch.int64:
        sorted_rows, order = torch.sort(rows.int(), stable=True)
    else:
        sorted_rows, order = torch.sort(rows, stable=True)
    num_pairs, dim = vectors.shape
    # Segment starts: the sorted positions whose row differs from the previous one, plus num_pairs at the
    # end (one pass and one nonzero, instead of unique_consecutive's counts and a cumsum).
    is_start = torch.ones(num_pairs + 1, dtype=torch.bool, device=vectors.device)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=is_start[1:num_pairs])
    seg_start = is_start.nonzero().view(-1)
    num_unique = seg_start.shape[0] - 1
    unique_rows = sorted_rows[seg_start[:-1]].to(rows.dtype)
    sums = kernel_output((num_unique, dim), torch.float32, vectors.device)
    if num_unique:
        params = _segment_params(dim)
        grid = (triton.cdiv(num_unique, params["BLOCK_G"]), triton.cdiv(dim, params["BLOCK_D"]))
        _segment_sum_kernel[grid](vectors, order, seg_start, sums, num_unique, D=dim, **params)
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


def gather_bwd_sparse(grad: Tensor, flat_rows: Tensor, deterministic: bool,
                      num_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """``[..., H * D]`` gradient -> the rows read ``[U]`` (unique, ascending) and their summed gradients ``[U, D]``.

    ``num_rows``: the table's row count, if known (the rows lie below it), for a cheaper sort.
    """
    rows, vectors = _pairs(grad, flat_rows)
    if deterministic:
        unique_rows, sums = _segment_sums(vectors, rows, num_rows)
    else:
        unique_rows, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        sums = _scatter_add(vectors, inverse, unique_rows.shape[0])
    return unique_rows, sums.to(grad.dtype)


def gather_bwd_dense(grad: Tensor, flat_rows: Tensor, num_rows: int, deterministic: bool) -> Tensor:
    """``[..., H * D]`` gradient -> the dense ``[num_rows, D]`` gradient of the table."""
    if not deterministic:
        rows, vectors = _pairs(grad, flat_rows)
        return _scatter_add(vectors, rows, num_rows).to(grad.dtype)
    unique_rows, values = gather_bwd_sparse(grad, flat_rows, deterministic=True, num_rows=num_rows)
    out = torch.zeros(num_rows, values.shape[1], dtype=grad.dtype, device=grad.device)
    return out.index_copy_(0, unique_rows, values)
