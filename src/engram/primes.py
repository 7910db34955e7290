"""Exact primality and the next free prime: the table sizes of Engram's hashing are distinct primes
(docs/design.md §2; :func:`engram.config.table_sizes_for` picks them)."""

from __future__ import annotations

# Deterministic Miller-Rabin witnesses for every n < 3.3e24 (covers all int64 table sizes).
_MR_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Exact primality for any ``n < 3.3e24`` (deterministic Miller-Rabin)."""
    if n < 2:
        return False
    for p in _MR_WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(after: int, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """Smallest prime strictly greater than ``after`` that is not in ``taken``."""
    candidate = after + 1
    while not (is_prime(candidate) and candidate not in taken):
        candidate += 1
    return candidate
