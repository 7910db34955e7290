"""Multi-head n-gram hashing of every Engram layer at once, on Triton or in plain torch.

Shapes: ``B`` batch, ``T`` tokens, ``V`` original vocabulary, ``L`` Engram layers, ``N`` max_ngram_size,
``K`` heads per order, ``H = (N - 1) * K`` row ids per token per layer. A negative original id
(``naive.DEAD_TOKEN``) marks a dead position: every look-back that reaches it reads the pad id there and
further back (``naive.py`` states it).
"""

from __future__ import annotations

import torch

from engram.kernels.dispatch import kernel_output, use_triton
from engram.kernels.hash.naive import FAST_MOD_MAX_PRIME, ngram_hash_decode_naive, ngram_hash_naive

_BLOCK_T = 64
_BLOCK_B = 64


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_constants(lookup: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor) -> tuple[int, int, int]:
    if lookup.dim() != 1 or multipliers.dim() != 2 or primes.dim() != 3:
        raise ValueError(
            f"expected lookup [V], multipliers [L, N], primes [L, N - 1, K]; got shapes {tuple(lookup.shape)}, "
            f"{tuple(multipliers.shape)}, {tuple(primes.shape)}"
        )
    layers, n = multipliers.shape
    if n < 2 or primes.shape[:2] != (layers, n - 1) or primes.shape[2] < 1:
        raise ValueError(f"primes must be [L={layers}, N - 1={n - 1}, K>=1], got {tuple(primes.shape)}")
    return layers, n, primes.shape[2]


def _fast_mod(primes: torch.Tensor, fast_mod: bool | None) -> bool:
    """Whether every prime is below ``FAST_MOD_MAX_PRIME`` (the kernels' exact fp64 modulo); else plain ``%``.

    ``fast_mod`` given (the hasher knows its primes on the host) is the answer: no device read, so the launch
    traces into a compiled graph. Otherwise reading the maximum synchronizes with the device, so the answer is
    cached on the tensor, keyed by its version counter so in-place edits are seen.
    """
    if fast_mod is not None:
        return fast_mod
    cached = getattr(primes, "_engram_fast_mod", None)
    if cached is not None and cached[0] == primes._version:
        return cached[1]
    fast = primes.numel() == 0 or int(primes.max()) < FAST_MOD_MAX_PRIME
    primes._engram_fast_mod = (primes._version, fast)
    return fast


def _check_ids(name: str, ids: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if ids.dtype != torch.int64 or tuple(ids.shape) != shape or ids.device != device:
        raise ValueError(
            f"{name} must be an int64 tensor of shape {list(shape)} on {device}; got {ids.dtype} "
            f"{list(ids.shape)} on {ids.device}"
        )


def ngram_hash(
    raw_ids: torch.Tensor,
    lookup: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    pad_id: int,
    history: torch.Tensor | None = None,
    force: bool | None = None,
    fast_mod: bool | None = None,
) -> torch.Tensor:
    """Row ids of every head, order and layer for a batch of token ids, in one launch.

    Args:
        raw_ids: ``[B, T]`` int64 original ids, each in ``[0, V)`` or negative at a dead position (not checked
            here).
        lookup: ``[V]`` int64 original id -> compressed id (``CompressedTokenizer.lookup``).
        multipliers: ``[L, N]`` int64 multipliers per layer (``NgramHasher.multipliers`` in ``layer_ids`` order).
        primes: ``[L, N - 1, K]`` int64 table sizes per layer, order and head (``NgramHasher.table_sizes``).
        pad_id: the COMPRESSED pad id, read before the start of a sequence when ``history`` is ``None``, and
            at and before a dead position.
        history: optional ``[B, N - 1]`` int64 original ids preceding ``raw_ids``, oldest first, negative where
            dead; the caller left-fills missing positions with the original pad id.
        force: ``True`` insists on Triton, ``False`` on plain torch, ``None`` picks (see ``use_triton``).
        fast_mod: whether every prime is below ``FAST_MOD_MAX_PRIME``, if the caller knows (``NgramHasher``
            does); ``None`` reads it from ``primes`` once (a device sync, which breaks a compiled graph).
    Returns:
        ``[L, B, T, H]`` int64; column ``(n - 2) * K + j`` of layer ``l`` is row
        ``(XOR_{k<n} x_{t-k} * m_k) % primes[l, n - 2, j]`` of head ``j`` of order ``n`` (``x_{t-k}`` the pad
        id when any of positions ``t-k..t`` is dead).

    Example:
        >>> from engram import EngramConfig, NgramHasher
        >>> hasher = NgramHasher(EngramConfig())
        >>> consts = (torch.from_numpy(hasher.tokenizer.lookup),
        ...           torch.tensor([hasher.multipliers[l] for l in hasher.cfg.layer_ids]),
        ...           torch.tensor([hasher.table_sizes[l] for l in hasher.cfg.layer_ids]))
        >>> ngram_hash(torch.tensor([[100, 2000, 30000]]), *consts, hasher.pad_id).shape
        torch.Size([2, 1, 3, 16])
    """
    layers, n, heads = _check_constants(lookup, multipliers, primes)
    if raw_ids.dim() != 2:
        raise ValueError(f"raw_ids must be [B, T], got shape {tuple(raw_ids.shape)}")
    batch, length = raw_ids.shape
    device = raw_ids.device
    _check_ids("raw_ids", raw_ids, (batch, length), device)
    for name, tensor in (("lookup", lookup), ("multipliers", multipliers), ("primes", primes)):
        _check_ids(name, tensor, tuple(tensor.shape), device)
    if history is not None:
        _check_ids("history", history, (batch, n - 1), device)
    if not use_triton(raw_ids, force):
        return ngram_hash_naive(raw_ids, lookup, multipliers, primes, pad_id, history)

    # Imported on first use: @triton.jit reads TRITON_INTERPRET when the kernel module is imported.
    from engram.kernels.hash.triton_hash import ngram_hash_kernel

    out = kernel_output((layers, batch, length, (n - 1) * heads), torch.int64, device)
    if out.numel() == 0:
        return out
    block = min(_BLOCK_T, _next_power_of_2(length))
    grid = (_cdiv(length, block), batch)
    ngram_hash_kernel[grid](
        raw_ids.contiguous(), history.contiguous() if history is not None else raw_ids, lookup.contiguous(),
        multipliers.contiguous(), primes.contiguous(), out, length, batch, pad_id,
        L=layers, N=n, K=heads, HP=_next_power_of_2((n - 1) * heads),
        HAS_HISTORY=history is not None, BLOCK_T=block, FAST_MOD=_fast_mod(primes, fast_mod),
    )
    return out


def ngram_hash_decode(
    new_ids: torch.Tensor,
    history: torch.Tensor,
    lookup: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    pad_id: int,
    force: bool | None = None,
    fast_mod: bool | None = None,
) -> torch.Tensor:
    """Row ids of one new token per sequence (decoding with a KV cache); advances ``history`` in place.

    Args:
        new_ids: ``[B]`` int64 original ids of the new tokens (negative if dead).
        history: ``[B, N - 1]`` contiguous int64 original ids preceding them, oldest first, negative where dead
            (start a sequence with the original pad id); shifted left by one with ``new_ids`` appended, in the
            same launch.
        lookup, multipliers, primes, pad_id, force, fast_mod: as in :func:`ngram_hash`.
    Returns:
        ``[L, B, H]`` int64, equal to :func:`ngram_hash` of the whole sequence at the new position.

    Example:
        >>> # hasher, consts as in ngram_hash's example
        >>> history = torch.full((1, hasher.context), hasher.cfg.pad_id)
        >>> [ngram_hash_decode(torch.tensor([t]), history, *consts, hasher.pad_id).shape for t in (100, 2000)]
        [torch.Size([2, 1, 16]), torch.Size([2, 1, 16])]
        >>> history.tolist()
        [[100, 2000]]
    """
    layers, n, heads = _check_constants(lookup, multipliers, primes)
    if new_ids.dim() != 1:
        raise ValueError(f"new_ids must be [B], got shape {tuple(new_ids.shape)}")
    batch = new_ids.shape[0]
    device = new_ids.device
    _check_ids("new_ids", new_ids, (batch,), device)
    _check_ids("history", history, (batch, n - 1), device)
    if not history.is_contiguous():
        raise ValueError("history is updated in place and must be contiguous")
    for name, tensor in (("lookup", lookup), ("multipliers", multipliers), ("primes", primes)):
        _check_ids(name, tensor, tuple(tensor.shape), device)
    if not use_triton(new_ids, force):
        return ngram_hash_decode_naive(new_ids, history, lookup, multipliers, primes, pad_id)

    from engram.kernels.hash.triton_hash import ngram_hash_decode_kernel

    out = kernel_output((layers, batch, (n - 1) * heads), torch.int64, device)
    if batch == 0:
        return out
    block = min(_BLOCK_B, _next_power_of_2(batch))
    ngram_hash_decode_kernel[(_cdiv(batch, block),)](
        new_ids.contiguous(), history, lookup.contiguous(), multipliers.contiguous(), primes.contiguous(), out,
        batch, pad_id, L=layers, N=n, K=heads, HP=_next_power_of_2((n - 1) * heads),
        BLOCK_B=block, FAST_MOD=_fast_mod(primes, fast_mod),
    )
    return out
