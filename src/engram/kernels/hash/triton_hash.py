"""Triton kernels of the n-gram hash: one launch covers every layer, order and head.

A program owns a block of rows (tokens of one sequence in prefill, sequences in decode). It gathers the
compressed id of each row and of its ``N - 1`` predecessors once (a tuple of ``N`` row vectors, entry
``k`` the id ``k`` positions back), then per layer XORs the products into the mix of every order and
writes the layer's ``[BLOCK, H]`` block of row ids with one contiguous store.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _hash_rows(
    xs,
    mult_ptr,
    primes_ptr,
    out_ptr,
    out_rows,
    row_mask,
    layer_rows,
    L: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    HP: tl.constexpr,
):
    """Writes rows ``l * layer_rows + out_rows`` of the ``[*, H]`` output for every layer ``l``."""
    H: tl.constexpr = (N - 1) * K
    hcols = tl.arange(0, HP)
    hmask = hcols < H
    order = hcols // K  # order - 2 of each output column
    mask = row_mask[:, None] & hmask[None, :]
    for l in tl.static_range(L):
        mix = xs[0] * tl.load(mult_ptr + l * N)
        mixes = tl.full([out_rows.shape[0], HP], 0, tl.int64)
        for k in tl.static_range(1, N):
            mix = mix ^ (xs[k] * tl.load(mult_ptr + l * N + k))
            mixes = tl.where(order[None, :] == k - 1, mix[:, None], mixes)
        # other=1 keeps the padding columns away from a division by zero.
        primes = tl.load(primes_ptr + l * H + hcols, mask=hmask, other=1)
        # Non-negative int64 operands: the C remainder (srem) equals the floor modulo of the reference.
        rows = mixes % primes[None, :]
        offsets = (l * layer_rows + out_rows)[:, None] * H + hcols[None, :]
        tl.store(out_ptr + offsets, rows, mask=mask)


@triton.jit
def ngram_hash_kernel(
    raw_ptr,  # [B, T] original ids
    hist_ptr,  # [B, N - 1] original ids, read only when HAS_HISTORY
    lookup_ptr,  # [V]
    mult_ptr,  # [L, N]
    primes_ptr,  # [L, N - 1, K]
    out_ptr,  # [L, B, T, H]
    T,
    B,
    pad_id,
    L: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    HP: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_mask = t < T
    xs = ()
    for k in tl.static_range(N):
        pos = t - k
        found = row_mask & (pos >= 0)
        raw = tl.load(raw_ptr + b * T + pos, mask=found, other=0)
        if HAS_HISTORY:
            in_hist = row_mask & (pos < 0)
            raw = tl.where(in_hist, tl.load(hist_ptr + b * (N - 1) + (N - 1) + pos, mask=in_hist, other=0), raw)
            found = found | in_hist
        xs = xs + (tl.where(found, tl.load(lookup_ptr + raw, mask=found, other=0), pad_id),)
    _hash_rows(xs, mult_ptr, primes_ptr, out_ptr, b * T + t, row_mask, tl.cast(B, tl.int64) * T, L, N, K, HP)


@triton.jit
def ngram_hash_decode_kernel(
    new_ptr,  # [B] original ids
    hist_ptr,  # [B, N - 1] original ids, shifted in place
    lookup_ptr,
    mult_ptr,
    primes_ptr,
    out_ptr,  # [L, B, H]
    B,
    L: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    HP: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = b < B
    hist_row = hist_ptr + b * (N - 1)
    new = tl.load(new_ptr + b, mask=row_mask, other=0)
    xs = (tl.load(lookup_ptr + new, mask=row_mask, other=0),)
    raws = ()
    for k in tl.static_range(1, N):
        raw = tl.load(hist_row + (N - 1 - k), mask=row_mask, other=0)
        xs = xs + (tl.load(lookup_ptr + raw, mask=row_mask, other=0),)
        raws = raws + (raw,)
    # Threads sharing a row overwrite slots that others read: every read of history completes first.
    tl.debug_barrier()
    tl.store(hist_row + (N - 2), new, mask=row_mask)
    for k in tl.static_range(1, N - 1):
        tl.store(hist_row + (N - 2 - k), raws[k - 1], mask=row_mask)
    _hash_rows(xs, mult_ptr, primes_ptr, out_ptr, b, row_mask, tl.cast(B, tl.int64), L, N, K, HP)
