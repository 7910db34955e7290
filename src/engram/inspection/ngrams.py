"""The most frequent n-grams of a token array, counted with NumPy (one int64 key per n-gram)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class FrequentNgrams:
    """The ``top`` most frequent n-grams of one order, most frequent first (ties: smaller key first).

    ``key = ids[0] * base**(n-1) + ids[1] * base**(n-2) + ... + ids[n-1]`` (see :func:`ngram_keys`).
    """

    order: int
    base: int
    keys: np.ndarray  # int64 [N]
    ngrams: np.ndarray  # int64 [N, order] token ids, oldest first
    counts: np.ndarray  # int64 [N] occurrences
    last_positions: np.ndarray  # int64 [N] index, in the counted array, of the last token of the first occurrence

    def __len__(self) -> int:
        return len(self.keys)


def ngram_keys(ids: np.ndarray, order: int, base: int) -> np.ndarray:
    """int64 ``[..., S - order + 1]`` from ids ``[..., S]``: entry ``i`` is the key of ``ids[..., i : i + order]``.

    ``base`` must exceed every id; ``base**order`` must fit in int64.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if base ** order > _INT64_MAX:
        raise ValueError(f"{order}-gram keys of a vocabulary of {base} ids overflow int64")
    ids = np.asarray(ids, dtype=np.int64)
    count = max(ids.shape[-1] - order + 1, 0)
    keys = np.zeros((*ids.shape[:-1], count), dtype=np.int64)
    for k in range(order):
        keys = keys * base + ids[..., k:k + count]
    return keys


def frequent_ngrams(ids: np.ndarray, order: int, top: int, base: int, exclude: int | None = None,
                    min_count: int = 2) -> FrequentNgrams:
    """The ``top`` most frequent ``order``-grams of ``ids`` that occur at least ``min_count`` times.

    Args:
        ids: ``[S]`` integer token ids (a corpus sample; documents back to back).
        base: above every id (the vocabulary size).
        exclude: an id (BOS) whose n-grams are not counted: they straddle two documents.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    ids = np.asarray(ids, dtype=np.int64)
    keys = ngram_keys(ids, order, base)
    keep = np.ones(len(keys), dtype=bool)
    if exclude is not None:
        for k in range(order):
            keep &= ids[k:k + len(keys)] != exclude
    last = np.flatnonzero(keep) + order - 1
    unique, first, counts = np.unique(keys[keep], return_index=True, return_counts=True)
    frequent = counts >= min_count
    unique, first, counts = unique[frequent], first[frequent], counts[frequent]
    pick = np.argsort(-counts, kind="stable")[:top]
    last_positions = last[first[pick]]
    ngrams = np.stack([ids[last_positions - order + 1 + k] for k in range(order)], axis=1)
    return FrequentNgrams(order, base, unique[pick], ngrams.reshape(len(pick), order), counts[pick], last_positions)
