"""The specification of the n-gram hash in plain PyTorch (bit-exact with ``NgramHasher.hash_all``).

Shapes: ``B`` batch, ``T`` tokens, ``V`` original vocabulary, ``L`` Engram layers, ``N`` max_ngram_size,
``K`` heads per order, ``H = (N - 1) * K`` row ids per token per layer. Every value is non-negative and
every product ``x * m`` fits in int64 (multipliers are bounded by ``int64max // compressed vocab``), so
the C-style remainder of the kernels and Python's floor modulo agree.

Dead positions (e.g. image placeholders) carry a negative original id, :data:`DEAD_TOKEN`, in ``raw_ids``
and ``history``: a look-back that reaches one stops there, so that position and every older one read the pad
id (a dead position itself reads pad at every order).
"""

from __future__ import annotations

import torch

DEAD_TOKEN = -1  # the original id written at a dead position (any negative id counts as dead)
# Every prime (table size) below this takes the kernels' exact fp64 modulo; the kernels fall back to ``%`` otherwise.
FAST_MOD_MAX_PRIME = 1 << 50


def ngram_hash_naive(
    raw_ids: torch.Tensor,
    lookup: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    pad_id: int,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row ids of every head of every layer.

    Args:
        raw_ids: ``[B, T]`` int64 original token ids, each in ``[0, V)`` or negative (dead).
        lookup: ``[V]`` int64 original id -> compressed id.
        multipliers: ``[L, N]`` int64 odd multipliers ``m_0..m_{N-1}`` per layer.
        primes: ``[L, N - 1, K]`` int64 table size per layer, order (2..N) and head.
        pad_id: the compressed id read before the start of a sequence and at or past a dead position.
        history: optional ``[B, N - 1]`` original ids preceding ``raw_ids`` (oldest first, negative if dead);
            ``None`` reads pad.
    Returns:
        ``[L, B, T, H]`` int64: for layer ``l``, column ``(n - 2) * K + j`` holds
        ``(XOR_{k<n} x_{t-k} * m_k) % primes[l, n - 2, j]``, where ``x_{t-k}`` is the pad id if any of
        positions ``t-k..t`` is dead.
    """
    batch, length = raw_ids.shape
    steps = multipliers.shape[1] - 1
    context = raw_ids if history is None else torch.cat([history, raw_ids], dim=1)
    dead = context < 0
    compressed = torch.where(dead, pad_id, lookup[context.clamp(min=0)])
    if history is None:  # before the start: pad, never dead
        compressed = torch.cat([compressed.new_full((batch, steps), pad_id), compressed], dim=1)
        dead = torch.cat([dead.new_zeros(batch, steps), dead], dim=1)  # [B, N - 1 + T]
    blocked = dead.new_zeros(batch, length)  # whether the look-back from t has reached a dead position
    products = []
    for k in range(steps + 1):
        blocked = blocked | dead[:, steps - k : steps - k + length]
        x = compressed[:, steps - k : steps - k + length].masked_fill(blocked, pad_id)  # x_{t-k}, [B, T]
        products.append(x * multipliers[:, k, None, None])  # [L, B, T]
    mixes = []
    mix = products[0]
    for product in products[1:]:
        mix = mix ^ product
        mixes.append(mix)
    rows = torch.stack(mixes, dim=-1).unsqueeze(-1) % primes[:, None, None]  # [L, B, T, N - 1, K]
    return rows.flatten(start_dim=-2)


def ngram_hash_decode_naive(
    new_ids: torch.Tensor,
    history: torch.Tensor,
    lookup: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    pad_id: int,
) -> torch.Tensor:
    """Row ids of one new token per sequence; shifts ``history`` left in place and appends ``new_ids``.

    Args:
        new_ids: ``[B]`` int64 original ids of the new tokens (negative if dead).
        history: ``[B, N - 1]`` int64 original ids preceding them (oldest first, negative if dead), updated
            in place.
        lookup, multipliers, primes, pad_id: as in :func:`ngram_hash_naive`.
    Returns:
        ``[L, B, H]`` int64, equal to :func:`ngram_hash_naive` of the whole sequence at the new position.
    """
    rows = ngram_hash_naive(new_ids[:, None], lookup, multipliers, primes, pad_id, history)[:, :, 0]
    history.copy_(torch.cat([history[:, 1:], new_ids[:, None]], dim=1))
    return rows
