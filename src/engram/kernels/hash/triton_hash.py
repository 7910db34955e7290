"""Triton kernels of the n-gram hash: one launch covers every layer, order and head.

A program owns a block of rows (tokens of one sequence in prefill, sequences in decode). It gathers the
compressed id of each row and of its ``N - 1`` predecessors once (a tuple of ``N`` row vectors, entry
``k`` the id ``k`` positions back), then per layer XORs the products into the mix of every order and
writes the layer's ``[BLOCK, H]`` block of row ids with one contiguous store. A negative original id marks
a dead position: the gather keeps a running "look-back reached a dead position" flag per row and reads the
pad id from there on (see ``naive.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _mod_fp64(m, m_f, p, inv_p):
    """``m % p``, exactly, for int64 ``0 <= m < 2^63`` and ``2 <= p < 2^50``, without a 64-bit division.

    ``m_f = fl(m)`` and ``inv_p = fl(1 / p)`` are the fp64 roundings of ``m`` and ``1 / p`` (``inv_p`` only
    needs to be within 1 ulp). Two truncated fp64 quotient estimates, each followed by an exact int64
    ``r - q * p``; int64 arithmetic wraps, so each residual is exact whenever its true value fits in int64.

    Proof sketch (u = 2^-53, the fp64 unit roundoff; each rounding has relative error <= u, inv_p <= 2u):
      1. Q1 = fl(m_f * inv_p) = (m / p)(1 + e1) with |e1| <= (1+u)^2 (1+2u) - 1 < 4.0001u. As 0 <= Q1 <=
         2^62 (1 + e1) < 2^63, q1 = trunc(Q1) is a valid int64 with |q1 - m / p| < 1 + (m / p) 4.0001u, so
         r1 = m - q1 p = p (m / p - q1) has |r1| < p + m 4.0001u < p + 2^63 4.0001u < p + 4097 (< 2^51).
      2. |r1| < 2^53, so R = fl(r1) = r1 exactly and Q2 = fl(R * inv_p) = (r1 / p)(1 + e2), |e2| < 4.0001u
         (no int -> fp64 rounding now). q2 = trunc(Q2) has |q2 - r1 / p| < 1 + |r1 / p| 4.0001u, so
         r2 = r1 - q2 p has |r2| < p + |r1| 4.0001u < p + (2^50 + 4097) 4.0001u < p + 0.51.
      3. r2 is an integer congruent to m mod p with |r2| < p + 1: -p <= r2 <= p. Adding p when r2 < 0 and
         subtracting p when r2 >= p leaves the unique representative in [0, p), i.e. C's m % p (m >= 0).
    Everything here is deterministic IEEE arithmetic (no contraction applies: no product feeds an add), so
    the interpreter computes the same bits.
    """
    q1 = (m_f * inv_p).to(tl.int64)
    r1 = m - q1 * p
    q2 = (r1.to(tl.float64) * inv_p).to(tl.int64)
    r2 = r1 - q2 * p
    r2 = tl.where(r2 < 0, r2 + p, r2)
    return tl.where(r2 >= p, r2 - p, r2)


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
    FAST_MOD: tl.constexpr,
):
    """Writes rows ``l * layer_rows + out_rows`` of the ``[*, H]`` output for every layer ``l``.

    ``FAST_MOD`` (every prime below ``naive.FAST_MOD_MAX_PRIME``) reduces with :func:`_mod_fp64` instead of the
    emulated 64-bit ``%``; both are exact on the valid inputs (non-negative mixes).
    """
    H: tl.constexpr = (N - 1) * K
    hcols = tl.arange(0, HP)
    hmask = hcols < H
    order = hcols // K  # order - 2 of each output column
    mask = row_mask[:, None] & hmask[None, :]
    for l in tl.static_range(L):
        mix = xs[0] * tl.load(mult_ptr + l * N)
        mixes = tl.full([out_rows.shape[0], HP], 0, tl.int64)
        if FAST_MOD:
            # Converted once per order (not per head): the fp64 copy rides along with the int64 mix.
            mixes_f = tl.full([out_rows.shape[0], HP], 0.0, tl.float64)
        for k in tl.static_range(1, N):
            mix = mix ^ (xs[k] * tl.load(mult_ptr + l * N + k))
            is_order = order[None, :] == k - 1
            mixes = tl.where(is_order, mix[:, None], mixes)
            if FAST_MOD:
                mixes_f = tl.where(is_order, mix.to(tl.float64)[:, None], mixes_f)
        # other=2 keeps the padding columns away from a division by zero (and the fp64 quotient below 2^63).
        primes = tl.load(primes_ptr + l * H + hcols, mask=hmask, other=2)
        if FAST_MOD:
            rows = _mod_fp64(mixes, mixes_f, primes[None, :], (1.0 / primes.to(tl.float64))[None, :])
        else:
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
    FAST_MOD: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_mask = t < T
    blocked = t < 0  # the look-back from t has reached a dead position (none yet)
    xs = ()
    for k in tl.static_range(N):
        pos = t - k
        found = row_mask & (pos >= 0)
        raw = tl.load(raw_ptr + b * T + pos, mask=found, other=0)
        if HAS_HISTORY:
            in_hist = row_mask & (pos < 0)
            raw = tl.where(in_hist, tl.load(hist_ptr + b * (N - 1) + (N - 1) + pos, mask=in_hist, other=0), raw)
            found = found | in_hist
        blocked = blocked | (raw < 0)
        live = found & ~blocked
        xs = xs + (tl.where(live, tl.load(lookup_ptr + raw, mask=live, other=0), pad_id),)
    _hash_rows(xs, mult_ptr, primes_ptr, out_ptr, b * T + t, row_mask, tl.cast(B, tl.int64) * T, L, N, K, HP,
               FAST_MOD)


@triton.jit
def ngram_hash_decode_kernel(
    new_ptr,  # [B] original ids
    hist_ptr,  # [B, N - 1] original ids, shifted in place
    lookup_ptr,
    mult_ptr,
    primes_ptr,
    out_ptr,  # [L, B, H]
    B,
    pad_id,
    L: tl.constexpr,
    N: tl.constexpr,
    K: tl.constexpr,
    HP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    FAST_MOD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = b < B
    hist_row = hist_ptr + b * (N - 1)
    new = tl.load(new_ptr + b, mask=row_mask, other=0)
    blocked = new < 0  # the look-back has reached a dead position
    xs = (tl.where(blocked, pad_id, tl.load(lookup_ptr + new, mask=row_mask & ~blocked, other=0)),)
    raws = ()
    for k in tl.static_range(1, N):
        raw = tl.load(hist_row + (N - 1 - k), mask=row_mask, other=0)
        blocked = blocked | (raw < 0)
        xs = xs + (tl.where(blocked, pad_id, tl.load(lookup_ptr + raw, mask=row_mask & ~blocked, other=0)),)
        raws = raws + (raw,)
    # Threads sharing a row overwrite slots that others read: every read of history completes first.
    tl.debug_barrier()
    tl.store(hist_row + (N - 2), new, mask=row_mask)
    for k in tl.static_range(1, N - 1):
        tl.store(hist_row + (N - 2 - k), raws[k - 1], mask=row_mask)
    _hash_rows(xs, mult_ptr, primes_ptr, out_ptr, b, row_mask, tl.cast(B, tl.int64), L, N, K, HP, FAST_MOD)
