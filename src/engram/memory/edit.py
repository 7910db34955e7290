"""Offline editing: what a text reads from memory (:func:`lookup`), and new contents for one n-gram's rows
(:func:`write_ngram`).

Rows are shared: head ``j`` of order ``n`` reads row ``hash_j(n-gram) mod p_j``, so distinct n-grams collide.
:func:`lookup` shows, for each position of a text, the flat row every head reads, which frequent n-grams of a
corpus land on the same rows (what an edit of that row also changes), and how open each Engram gate was there;
:func:`lookup_deepseek_v41` does the same for the Engram layers of a DeepSeek-V4.1 checkpoint, without gates (they
need the backbone's hidden states) but with each row's L2 norm.
:func:`write_ngram` builds the patch that sets or blends the rows of one n-gram (every head of its order).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import Tensor

from engram.data.corpus import Corpus, bos_id, load_or_prepare
from engram.embedding import MultiHeadEmbedding
from engram.hashing import NgramHasher
from engram.inspection.hooks import recorded_gates
from engram.memory.patch import MemoryPatch, engram_tables, model_fingerprint
from engram.model import EngramLM
from engram.models.deepseek_v41 import DeepSeekV41Engram

DEFAULT_TOP_NGRAMS = 5000  # most frequent n-grams per order whose rows are known
DEFAULT_CORPUS_TOKENS = 2_000_000  # tokens of the corpus counted (from the start of its train split)
WRITE_MODES = ("set", "blend")


@dataclass(frozen=True)
class Collision:
    """A frequent n-gram of the corpus that reads the same row."""

    ngram: str
    count: int  # occurrences in the counted tokens


@dataclass(frozen=True)
class HeadRead:
    """The row one hash head reads at one position."""

    order: int  # n of the n-gram
    head: int  # head within its order
    row: int  # flat row id of the layer's table (head offsets included)
    collisions: tuple[Collision, ...]  # most frequent first
    row_norm: float | None = None  # L2 norm of the row's values (DeepSeek-V4.1 lookups; None for EngramLM)


@dataclass(frozen=True)
class LayerRead:
    """What one Engram layer reads at one position."""

    layer: int
    gates: tuple[float, ...]  # alpha per residual branch, in (0, 1); empty when unknown (DeepSeek-V4.1)
    heads: tuple[HeadRead, ...]  # order 2 heads first


@dataclass(frozen=True)
class PositionRead:
    """One token of the looked-up text."""

    position: int
    token_id: int
    token: str
    ngrams: dict[int, str]  # order -> the n-gram ending here, as text (padding before the start included)
    layers: tuple[LayerRead, ...]


@dataclass(frozen=True)
class LookupResult:
    """What :func:`lookup` returns; :meth:`to_dict` is JSON-serialisable."""

    text: str
    positions: tuple[PositionRead, ...]
    corpus_tokens: int  # tokens counted for collisions (0: no corpus given)
    top_ngrams: int  # n-grams per order whose rows were compared

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FrequentNgrams:
    """The most frequent n-grams of each order of a token array and the rows every Engram layer reads for them.

    Attributes:
        keys: ``{order: int64 [K, order]}`` compressed ids (what the hash sees), most frequent first.
        texts: ``{order: [K] str}`` each n-gram's text, from its first occurrence.
        counts: ``{order: int64 [K]}`` occurrences.
        rows: ``{layer_id: {order: int64 [K, heads per order]}}`` flat row ids.
    """

    keys: dict[int, np.ndarray]
    texts: dict[int, list[str]]
    counts: dict[int, np.ndarray]
    rows: dict[int, dict[int, np.ndarray]]

    def collisions(self, layer_id: int, order: int, head: int, row: int,
                   own_key: np.ndarray) -> tuple[Collision, ...]:
        """The counted n-grams of ``order`` whose head ``head`` reads ``row``, except the one of key ``own_key``."""
        if order not in self.keys:  # the counted tokens were fewer than ``order``
            return ()
        hits = np.flatnonzero(self.rows[layer_id][order][:, head] == row)
        return tuple(Collision(self.texts[order][i], int(self.counts[order][i])) for i in hits
                     if not np.array_equal(self.keys[order][i], own_key))


def _order_rows(hasher: NgramHasher, tables: dict[int, MultiHeadEmbedding], ids: Tensor, order: int
                ) -> dict[int, Tensor]:
    """Flat rows read by the heads of ``order`` at the last position of each ``[K, T]`` id sequence (``T >=
    order``): ``{layer_id: int64 [K, heads per order]}``."""
    heads = hasher.cfg.n_head_per_ngram
    columns = slice((order - 2) * heads, (order - 1) * heads)
    hashed = hasher.hash_all(ids)
    return {layer_id: table.flat_row_ids(hashed[layer_id].to(table.offsets.device))[:, -1, columns].cpu()
            for layer_id, table in tables.items()}


def frequent_ngrams(model: EngramLM, tokens: np.ndarray, top: int = DEFAULT_TOP_NGRAMS) -> FrequentNgrams:
    """Count the n-grams of every hashed order in ``tokens`` (original ids ``[N]``) by their compressed ids and
    keep the ``top`` most frequent of each (ties: first seen first), with the rows they read."""
    return _frequent_ngrams(model.hasher, engram_tables(model), tokens, top)


def _frequent_ngrams(hasher: NgramHasher, tables: dict[int, MultiHeadEmbedding], tokens: np.ndarray,
                     top: int) -> FrequentNgrams:
    """:func:`frequent_ngrams` for the layers of ``tables`` hashed by ``hasher``."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    originals = np.asarray(tokens, dtype=np.int64)
    compressed = hasher.tokenizer(originals)
    tokenizer = hasher.tokenizer.tokenizer
    keys, texts, counts, rows = {}, {}, {}, {}
    for order in range(2, hasher.cfg.max_ngram_size + 1):
        if len(compressed) < order:
            continue
        distinct, first, count = np.unique(sliding_window_view(compressed, order), axis=0, return_index=True,
                                           return_counts=True)
        kept = np.lexsort((first, -count))[:top]
        examples = sliding_window_view(originals, order)[first[kept]]  # [K, order] original ids
        keys[order], counts[order] = distinct[kept], count[kept]
        texts[order] = [tokenizer.decode(example.tolist(), skip_special_tokens=False) for example in examples]
        hashed = _order_rows(hasher, tables, torch.from_numpy(np.ascontiguousarray(examples)), order)
        for layer_id, layer_rows in hashed.items():
            rows.setdefault(layer_id, {})[order] = layer_rows.numpy()
    return FrequentNgrams(keys, texts, counts, rows)


def _collision_index(hasher: NgramHasher, tables: dict[int, MultiHeadEmbedding], tokenizer: str,
                     corpus: Corpus | str | os.PathLike[str] | list[str] | None, top_ngrams: int,
                     corpus_tokens: int) -> tuple[FrequentNgrams | None, int]:
    """The frequent n-grams of the first ``corpus_tokens`` tokens of ``corpus`` (prepared with ``tokenizer``) and
    how many tokens were counted; ``(None, 0)`` without a corpus."""
    if corpus_tokens < 1:
        raise ValueError(f"corpus_tokens must be >= 1, got {corpus_tokens}")
    if corpus is None:
        return None, 0
    if not isinstance(corpus, Corpus):
        corpus = load_or_prepare(corpus, tokenizer=tokenizer, progress=False)
    tokens = np.asarray(corpus.tokens("train")[:corpus_tokens])
    return _frequent_ngrams(hasher, tables, tokens, top_ngrams), len(tokens)


def _position_reads(hasher: NgramHasher, ids: list[int], rows: dict[int, np.ndarray], index: FrequentNgrams | None,
                    gates: dict[int, np.ndarray] | None = None, norms: dict[int, np.ndarray] | None = None
                    ) -> tuple[PositionRead, ...]:
    """One :class:`PositionRead` per id of ``ids`` (one sequence, from its start).

    Args:
        rows: ``{layer_id: int64 [T, H]}`` flat rows read.
        index: frequent n-grams whose collisions are listed, or None.
        gates: ``{layer_id: [T, M]}`` gate per branch, or None (unknown).
        norms: ``{layer_id: [T, H]}`` L2 norm of every row read, or None.
    """
    cfg = hasher.cfg
    tokenizer = hasher.tokenizer.tokenizer
    context = cfg.max_ngram_size - 1
    padded = np.asarray([cfg.pad_id] * context + ids, dtype=np.int64)  # what the hash reads before the start
    padded_keys = hasher.tokenizer(padded)
    positions = []
    for t, token_id in enumerate(ids):
        windows = {order: padded[t + context + 1 - order:t + context + 1] for order in range(2, cfg.max_ngram_size + 1)}
        layers = []
        for layer_id, layer_rows in rows.items():
            heads = []
            for column, row in enumerate(layer_rows[t].tolist()):
                order, head = 2 + column // cfg.n_head_per_ngram, column % cfg.n_head_per_ngram
                own_key = padded_keys[t + context + 1 - order:t + context + 1]
                collisions = index.collisions(layer_id, order, head, row, own_key) if index is not None else ()
                norm = None if norms is None else float(norms[layer_id][t, column])
                heads.append(HeadRead(order, head, row, collisions, norm))
            layer_gates = () if gates is None else tuple(gates[layer_id][t].tolist())
            layers.append(LayerRead(layer_id, layer_gates, tuple(heads)))
        positions.append(PositionRead(
            t, token_id, tokenizer.decode([token_id], skip_special_tokens=False),
            {order: tokenizer.decode(window.tolist(), skip_special_tokens=False) for order, window in windows.items()},
            tuple(layers)))
    return tuple(positions)


def _text_ids(model: EngramLM, text: str) -> list[int]:
    return model.hasher.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def lookup(model: EngramLM, text: str, corpus: Corpus | str | os.PathLike[str] | list[str] | None = None,
           top_ngrams: int = DEFAULT_TOP_NGRAMS, corpus_tokens: int = DEFAULT_CORPUS_TOKENS) -> LookupResult:
    """What ``text`` reads from memory, position by position (the text is read as a document: BOS first).

    Args:
        model: an ``EngramLM`` with Engram layers (any placement, any device).
        text: the text to look up.
        corpus: where collisions are counted: a prepared :class:`Corpus` or a data spec as ``engram train
            --data`` takes (tokenised with the model's tokenizer); ``None``: no collisions.
        top_ngrams: n-grams per order, most frequent first, whose rows are compared.
        corpus_tokens: tokens counted, from the start of the corpus's train split.
    Returns:
        A :class:`LookupResult`: per position the token, its n-grams, and per Engram layer the gate per branch
        and per order and head the flat row read with the frequent n-grams that collide on it.

    Example:
        >>> result = lookup(model, "the zebra code is", corpus="shakespeare")       # doctest: +SKIP
        >>> result.positions[-1].layers[0].heads[0].row                              # doctest: +SKIP
        41877
    """
    tables = engram_tables(model)
    tokenizer = model.hasher.tokenizer.tokenizer
    ids = [bos_id(tokenizer), *_text_ids(model, text)]
    if len(ids) > model.cfg.max_position_embeddings:
        raise ValueError(f"text of {len(ids)} tokens is longer than max_position_embeddings="
                         f"{model.cfg.max_position_embeddings}")
    index, counted = _collision_index(model.hasher, tables, model.cfg.tokenizer, corpus, top_ngrams, corpus_tokens)

    was_training = model.training
    model.eval()
    input_ids = torch.tensor([ids], device=model.embed.weight.device)
    with recorded_gates(model) as gates:
        model(input_ids, logits_to_keep=1)
    model.train(was_training)

    hashed = model.hasher.hash_all(input_ids.cpu())
    rows = {layer_id: table.flat_row_ids(hashed[layer_id].to(table.offsets.device))[0].cpu().numpy()
            for layer_id, table in tables.items()}
    positions = _position_reads(model.hasher, ids, rows, index,
                                gates={layer_id: recorded[-1][0].numpy() for layer_id, recorded in gates.items()})
    return LookupResult(text, positions, counted, top_ngrams if index is not None else 0)


@torch.no_grad()
def lookup_deepseek_v41(engram: DeepSeekV41Engram, text: str,
                        corpus: Corpus | str | os.PathLike[str] | list[str] | None = None,
                        top_ngrams: int = DEFAULT_TOP_NGRAMS, corpus_tokens: int = DEFAULT_CORPUS_TOKENS
                        ) -> LookupResult:
    """:func:`lookup` for the Engram layers of a DeepSeek-V4.1 checkpoint (:func:`engram.models.deepseek_v41.
    load_deepseek_v41_engram`): per position and loaded layer, the flat row of every head and the L2 norm of its
    dequantised values. Gates are left empty: they need the backbone's hidden states, which an Engram-only
    checkpoint does not give. Tokens of the loaded ``dead_token_ids`` are dead (hashed as pad, see
    :meth:`NgramHasher.hash_all`). ``corpus`` is tokenised with the V4.1 tokenizer (``engram.cfg.tokenizer``).

    Example:
        >>> engram = load_deepseek_v41_engram("DeepSeek-V4.1-Flash", layers=[14])    # doctest: +SKIP
        >>> result = lookup_deepseek_v41(engram, "the zebra code is")                # doctest: +SKIP
        >>> head = result.positions[-1].layers[0].heads[0]; head.row, head.row_norm  # doctest: +SKIP
    """
    tables = {layer_id: engram[layer_id].multi_head_embedding for layer_id in engram.layer_ids}
    tokenizer = engram.hasher.tokenizer.tokenizer
    ids = [bos_id(tokenizer), *tokenizer.encode(text, add_special_tokens=False).ids]
    index, counted = _collision_index(engram.hasher, tables, engram.cfg.tokenizer, corpus, top_ngrams, corpus_tokens)
    reads = engram.lookup(torch.tensor([ids]))
    positions = _position_reads(engram.hasher, ids, {layer_id: read.row_ids[0].cpu().numpy()
                                                     for layer_id, read in reads.items()}, index,
                                norms={layer_id: read.values[0].norm(dim=-1).cpu().numpy()
                                       for layer_id, read in reads.items()})
    return LookupResult(text, positions, counted, top_ngrams if index is not None else 0)


def _ngram_ids(model: EngramLM, ngram: str | Sequence[int]) -> list[int]:
    """The token ids of an n-gram given as text or ids, refused unless 2 to ``max_ngram_size`` long."""
    ids = _text_ids(model, ngram) if isinstance(ngram, str) else [int(i) for i in ngram]
    if not 2 <= len(ids) <= model.cfg.engram.max_ngram_size:
        raise ValueError(f"n-gram {ngram!r} is {len(ids)} token(s) {ids}; Engram hashes n-grams of 2 to "
                         f"{model.cfg.engram.max_ngram_size} tokens")
    return ids


def ngram_rows(model: EngramLM, ngram: str | Sequence[int]) -> dict[int, Tensor]:
    """The flat rows an n-gram reads in every Engram layer: ``{layer_id: int64 [heads per order]}`` ascending.

    ``ngram``: text (tokenised without BOS; write it as it appears mid-text, leading space included, e.g.
    ``" zebra code"``) or token ids, 2 to ``max_ngram_size`` tokens; the heads of its order are the ones read.
    """
    engram_tables(model)
    ids = _ngram_ids(model, ngram)
    rows = _order_rows(model.hasher, engram_tables(model), torch.tensor([ids]), len(ids))
    return {layer_id: layer_rows[0] for layer_id, layer_rows in rows.items()}


def write_ngram(model: EngramLM, ngram: str | Sequence[int], value: Tensor | float | str, layer: int | None = None,
                mode: str = "set", alpha: float = 0.5) -> MemoryPatch:
    """The patch that sets or blends the rows ``ngram`` reads (every head of its order), in one or every layer.

    The model is not changed: apply the patch (:func:`~engram.memory.apply_patch`, which returns its inverse),
    save it, or serve it as an overlay.

    Args:
        ngram: text or token ids, see :func:`ngram_rows`.
        value: the target rows: a tensor ``[head_dim]`` (every head) or ``[heads per order, head_dim]``; a number
            (every element, e.g. 0 to erase); or the text of another n-gram of the same length, whose rows are
            copied head by head (the n-gram then reads what that one reads).
        layer: one Engram layer; ``None``: every Engram layer.
        mode: ``"set"`` writes the target; ``"blend"`` writes ``(1 - alpha) * old + alpha * target``.
        alpha: the blend weight, in [0, 1].
    Returns:
        A :class:`MemoryPatch` over ``model`` holding the new rows.

    Example:
        >>> patch = write_ngram(model, " zebra code", " secret code", mode="blend", alpha=0.5)  # doctest: +SKIP
        >>> inverse = apply_patch(model, patch)                                               # doctest: +SKIP
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    tables = engram_tables(model)
    if layer is not None and layer not in tables:
        raise ValueError(f"layer {layer} is not an Engram layer of this model (Engram layers: {sorted(tables)})")
    rows = ngram_rows(model, ngram)
    source, tensor_value = None, None
    if isinstance(value, str):
        if len(_ngram_ids(model, value)) != len(_ngram_ids(model, ngram)):
            raise ValueError(f"value n-gram {value!r} must have as many tokens as {ngram!r}")
        source, described = ngram_rows(model, value), value
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"value must be a finite number, got {value}")
        described = float(value)
    else:
        tensor_value = torch.as_tensor(value)
        described = f"tensor {list(tensor_value.shape)}"
    layers = {}
    for layer_id in sorted(tables) if layer is None else [layer]:
        table = tables[layer_id].table()
        old = table.index_select(0, rows[layer_id].to(table.device)).cpu()  # [K, head_dim]
        if source is not None:
            target = table.index_select(0, source[layer_id].to(table.device)).cpu()
        elif tensor_value is None:
            target = torch.full_like(old, described)
        elif tensor_value.shape in (old.shape[1:], old.shape):
            target = tensor_value.to(old.device, old.dtype).expand_as(old)
        else:
            raise ValueError(f"value must be [{old.shape[1]}] or [{old.shape[0]}, {old.shape[1]}] (head_dim, or heads "
                             f"x head_dim), got {tuple(tensor_value.shape)}")
        new = target if mode == "set" else torch.lerp(old.float(), target.float(), alpha).to(old.dtype)
        layers[layer_id] = (rows[layer_id], new.contiguous())
    metadata = {"kind": "write", "ngram": ngram if isinstance(ngram, str) else [int(i) for i in ngram],
                "value": described, "mode": mode, **({"alpha": alpha} if mode == "blend" else {})}
    return MemoryPatch(layers, model_fingerprint(model), {}, metadata)
