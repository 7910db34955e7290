"""`engram inspect table`: how a corpus uses the Engram tables.

Over a sample of a corpus split, hashed exactly as the model hashes it (row ids from ``model.hasher``):

* **row occupancy**: the share of a head's (or a layer's) rows read at least once;
* **collision rate** per head: among the ``top_ngrams`` most frequent n-grams of the head's order, the
  share that share their row with another of them. N-grams are counted on compressed ids (the ids Engram
  hashes; ``"The"`` and ``"the"`` are one n-gram), leaving out those holding BOS. With uniform hashing
  into p rows the expected rate is ``1 - (1 - 1/p)^(N - 1)``;
* **Zipf curve**: row access counts by rank (log-log), and the share of all accesses that the k most
  read rows cover, for several k: the hit rate of a hot-row cache of k rows (``engram_cache_rows``, one
  cache per layer's table) that holds the right rows.

Writes ``table.json`` and ``table.png`` into ``out``. Only the hashing is involved, so a DeepSeek-V4.1
checkpoint needs nothing but its ``config.json`` (:func:`run_deepseek_v41_table_stats`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_write_text
from engram.data.corpus import Corpus
from engram.embedding import head_offsets
from engram.hashing import NgramHasher
from engram.inspection.hooks import engram_blocks
from engram.inspection.loading import (check_positive, checkpoint_folder, model_corpus, open_inspection, output_folder,
                                       tokenizer_corpus)
from engram.inspection.ngrams import frequent_ngrams
from engram.inspection.plotting import Figure, choose_fonts, figure_style, save_figure
from engram.model import EngramLM
from engram.models.deepseek_v41 import TOKENIZER, read_engram_config

JSON_FILE = "table.json"
PNG_FILE = "table.png"
_HASH_CHUNK = 1 << 16  # tokens hashed at once
_COVERAGE_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5)


@dataclass
class HeadStats:
    """One hash head of one Engram layer."""

    layer_id: int
    head: int  # column of the layer's row ids: order-2 heads first
    order: int
    table_size: int
    rows_read: int  # distinct rows read over the sample
    top_ngrams: int  # frequent n-grams of its order checked for collisions
    collided: int  # of them, those whose row holds another of them too

    @property
    def occupancy(self) -> float:
        return self.rows_read / self.table_size

    @property
    def collision_rate(self) -> float:
        return self.collided / self.top_ngrams if self.top_ngrams else 0.0

    @property
    def expected_collision_rate(self) -> float:
        """The rate uniform random hashing of ``top_ngrams`` n-grams into ``table_size`` rows would give."""
        return 1.0 - (1.0 - 1.0 / self.table_size) ** max(self.top_ngrams - 1, 0)


@dataclass
class LayerStats:
    """All heads of one Engram layer's flat table."""

    layer_id: int
    rows: int
    accesses: int  # sample tokens x heads
    row_counts: np.ndarray = field(repr=False)  # int64 [rows read], access count of each row read, descending

    @property
    def rows_read(self) -> int:
        return len(self.row_counts)

    @property
    def occupancy(self) -> float:
        return self.rows_read / self.rows

    def coverage(self) -> dict[int, float]:
        """``{k: share of accesses to the k most read rows}`` for powers of ten, fixed shares of the rows and all."""
        sizes = {10 ** i for i in range(1, len(str(self.rows)))}
        sizes |= {max(1, round(self.rows * f)) for f in (*_COVERAGE_FRACTIONS, 1.0)}
        cumulative = np.cumsum(self.row_counts)
        return {k: float(cumulative[min(k, len(cumulative)) - 1] / cumulative[-1]) for k in sorted(sizes)}

    def zipf_slope(self) -> float:
        """Least-squares slope of log(count) against log(rank) over the rows read at least twice (Zipf: ~ -1)."""
        counts = self.row_counts[self.row_counts >= 2]
        if len(counts) < 2:
            return float("nan")
        return float(np.polyfit(np.log(np.arange(1, len(counts) + 1)), np.log(counts), 1)[0])


@dataclass
class TableReport:
    """What :func:`run_table_stats` computed and wrote."""

    checkpoint: str
    tokens: int
    heads: list[HeadStats]
    layers: list[LayerStats]
    summary: Path
    png: Path


def _offsets(hasher: NgramHasher, layer_id: int) -> np.ndarray:
    """int64 ``[H]``: where each head's rows start in the layer's flat table."""
    return head_offsets(hasher.flat_table_sizes(layer_id)).numpy()


@torch.no_grad()
def row_access_counts(hasher: NgramHasher, ids: np.ndarray) -> dict[int, np.ndarray]:
    """``{layer_id: int64 [rows]}``: how often each row of the layer's flat table is read for ``ids`` ``[S]``.

    ``ids`` is hashed as one sequence (in chunks, each with the ids before it as history), every head of a
    position reading one row.
    """
    layers = sorted(hasher.cfg.layer_ids)  # in block order
    counts = {layer: np.zeros(sum(hasher.flat_table_sizes(layer)), dtype=np.int64) for layer in layers}
    offsets = {layer: _offsets(hasher, layer) for layer in layers}
    for start in range(0, len(ids), _HASH_CHUNK):
        chunk = torch.from_numpy(ids[start:start + _HASH_CHUNK].astype(np.int64))[None]
        history = torch.from_numpy(ids[max(0, start - hasher.context):start].astype(np.int64))[None]
        rows = hasher.hash_all(chunk, history=history if start else None)
        for layer, layer_rows in rows.items():
            flat = layer_rows[0].cpu().numpy() + offsets[layer]  # [C, H]
            counts[layer] += np.bincount(flat.ravel(), minlength=len(counts[layer]))
    return counts


@torch.no_grad()
def head_collisions(hasher: NgramHasher, ids: np.ndarray, top_ngrams: int, bos: int | None) -> list[HeadStats]:
    """Collision counts of every head among the ``top_ngrams`` most frequent n-grams of its order in ``ids``.

    ``rows_read`` is left 0 (see :func:`run_table_stats`).
    """
    lookup = hasher.tokenizer.lookup
    # Compressed ids renumbered over those that occur, in order (so n-grams sort as before): n-gram keys in the
    # base of the whole compressed vocabulary overflow int64 for V4.1's 4-grams (99,092^4).
    present, compressed = np.unique(lookup[ids], return_inverse=True)
    bos_key = None
    if bos is not None and int(lookup[bos]) in present:
        bos_key = int(np.searchsorted(present, lookup[bos]))
    heads_per_order = hasher.cfg.n_head_per_ngram
    stats = []
    for order in range(2, hasher.cfg.max_ngram_size + 1):
        frequent = frequent_ngrams(compressed.reshape(-1), order, top_ngrams, len(present), exclude=bos_key)
        # one raw occurrence of each: its last position hashes the whole n-gram (no padding involved)
        raw = ids[frequent.last_positions[:, None] - order + 1 + np.arange(order)]  # [N, order]
        rows = hasher.hash_all(torch.from_numpy(raw.astype(np.int64))) if len(raw) else {}
        for layer in hasher.cfg.layer_ids:
            for j in range(heads_per_order):
                head = (order - 2) * heads_per_order + j
                collided = 0
                if len(raw):
                    head_rows = rows[layer][:, -1, head].cpu().numpy()
                    _, inverse, counts = np.unique(head_rows, return_inverse=True, return_counts=True)
                    collided = int((counts[inverse] >= 2).sum())
                stats.append(HeadStats(layer, head, order, hasher.flat_table_sizes(layer)[head], 0, len(raw),
                                       collided))
    return sorted(stats, key=lambda s: (s.layer_id, s.head))


def table_statistics(model: EngramLM, ids: np.ndarray, top_ngrams: int, bos: int | None
                ) -> tuple[list[HeadStats], list[LayerStats]]:
    """Head and layer statistics of ``ids`` (int ``[S]``, a corpus sample) under ``model``'s hashing."""
    engram_blocks(model)  # refuses a model without Engram
    return hashing_statistics(model.hasher, ids, top_ngrams, bos)


def hashing_statistics(hasher: NgramHasher, ids: np.ndarray, top_ngrams: int, bos: int | None
                       ) -> tuple[list[HeadStats], list[LayerStats]]:
    """:func:`table_statistics` of every layer ``hasher`` hashes for (no model needed: a table of layer ``L`` has
    ``sum(hasher.flat_table_sizes(L))`` rows, head after head)."""
    counts = row_access_counts(hasher, ids)
    heads = head_collisions(hasher, ids, top_ngrams, bos)
    for head in heads:
        offset = int(_offsets(hasher, head.layer_id)[head.head])
        head.rows_read = int(np.count_nonzero(counts[head.layer_id][offset:offset + head.table_size]))
    layers = [LayerStats(layer, len(layer_counts), int(layer_counts.sum()),
                         -np.sort(-layer_counts[layer_counts > 0]))
              for layer, layer_counts in counts.items()]
    return heads, layers


def plot_table_stats(heads: list[HeadStats], layers: list[LayerStats], path: Path, title: str) -> str | None:
    """Occupancy and collisions per head, the Zipf curve and the cache coverage curve, into ``path``."""
    fonts = choose_fonts([title])
    with figure_style(fonts):
        fig = Figure(figsize=(15, 4.8), dpi=100, layout="tight")
        bars, zipf, cover = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 1]})
        x = np.arange(len(heads))
        bars.bar(x - 0.2, [h.occupancy for h in heads], 0.4, label="rows read at least once", color="tab:blue")
        bars.bar(x + 0.2, [h.collision_rate for h in heads], 0.4, label="frequent n-grams sharing a row",
                 color="tab:red")
        bars.scatter(x + 0.2, [h.expected_collision_rate for h in heads], marker="_", s=120, color="black",
                     zorder=3, label="sharing expected (uniform hashing)")
        bars.set_xticks(x, [f"b{h.layer_id} h{h.head}\n{h.order}-gram" for h in heads], fontsize=7)
        bars.set_ylabel("share")
        bars.set_ylim(0, 1)
        bars.set_title(f"per head (top {heads[0].top_ngrams if heads else 0} n-grams per order)", fontsize=10)
        bars.legend(fontsize=7)
        for layer in layers:
            ranks = np.arange(1, layer.rows_read + 1)
            zipf.loglog(ranks, layer.row_counts, label=f"block {layer.layer_id} (slope {layer.zipf_slope():.2f})")
            coverage = layer.coverage()
            cover.semilogx(ranks, np.cumsum(layer.row_counts) / layer.accesses, label=f"block {layer.layer_id}")
            cover.scatter(list(coverage), list(coverage.values()), s=12)
        zipf.set_xlabel("row rank")
        zipf.set_ylabel("accesses")
        zipf.set_title("Zipf curve of row accesses", fontsize=10)
        zipf.legend(fontsize=8)
        cover.set_xlabel("hot rows kept (k)")
        cover.set_ylabel("share of accesses to the k most read rows")
        cover.set_ylim(0, 1.02)
        cover.set_title("what a hot-row cache of k rows could serve", fontsize=10)
        cover.legend(fontsize=8)
        for ax in (bars, zipf, cover):
            ax.grid(alpha=0.3)
        fig.suptitle(title, fontsize=11)
        save_figure(fig, path, fonts.note)
    return fonts.note


def run_table_stats(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], data: list[str] | None = None,
                    device: str = "auto", tokens: int = 1_000_000, top_ngrams: int = 1000, split: str = "train"
                    ) -> TableReport:
    """Table statistics of the first ``tokens`` tokens of ``split`` of ``data``, written into ``out``.

    ``data`` as ``engram train --data``; default: the data of the run that wrote ``checkpoint``.
    """
    check_positive(tokens=tokens, top_ngrams=top_ngrams)
    folder, data, model = open_inspection(checkpoint, out, data, device)
    corpus = model_corpus(model, data)
    return _write_report(model.hasher, corpus, data, split, tokens, top_ngrams, folder,
                         str(checkpoint_folder(checkpoint)))


def run_deepseek_v41_table_stats(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], data: list[str],
                                 tokens: int = 1_000_000, top_ngrams: int = 1000, split: str = "train",
                                 tokenizer: str = TOKENIZER) -> TableReport:
    """:func:`run_table_stats` for a DeepSeek-V4.1 checkpoint folder: only its ``config.json`` is read (the hashing
    needs no weights), and ``data`` is tokenised with the V4 tokenizer (``tokenizer``)."""
    check_positive(tokens=tokens, top_ngrams=top_ngrams)
    if not data:
        raise ValueError("a DeepSeek-V4.1 checkpoint names no training data: pass --data")
    hasher = NgramHasher(read_engram_config(checkpoint, tokenizer))
    folder = output_folder(out)
    return _write_report(hasher, tokenizer_corpus(tokenizer, data), list(data), split, tokens, top_ngrams, folder,
                         str(checkpoint))


def _write_report(hasher: NgramHasher, corpus: Corpus, data: list[str], split: str, tokens: int, top_ngrams: int,
                  folder: Path, name: str) -> TableReport:
    """Statistics of the first ``tokens`` tokens of ``split`` of ``corpus`` under ``hasher``: the JSON and the plot."""
    ids = np.asarray(corpus.tokens(split)[:tokens], dtype=np.int64)
    if len(ids) == 0:
        raise ValueError(f"split {split!r} of {data} holds no tokens")
    heads, layers = hashing_statistics(hasher, ids, top_ngrams, corpus.info.bos_id)
    note = plot_table_stats(heads, layers, folder / PNG_FILE,
                            f"Engram tables of {name}: {len(ids):,} tokens of the {split} split")
    summary = {
        "checkpoint": name, "data": data, "split": split, "tokens": int(len(ids)), "font_note": note,
        "heads": [{**asdict(h), "occupancy": h.occupancy, "collision_rate": h.collision_rate,
                   "expected_collision_rate": h.expected_collision_rate} for h in heads],
        "layers": [{"layer_id": layer.layer_id, "rows": layer.rows, "rows_read": layer.rows_read,
                    "occupancy": layer.occupancy, "accesses": layer.accesses, "zipf_slope": layer.zipf_slope(),
                    "coverage": {str(k): v for k, v in layer.coverage().items()},
                    "top_row_counts": layer.row_counts[:100].tolist()} for layer in layers],
    }
    atomic_write_text(folder / JSON_FILE, json.dumps(summary, indent=1) + "\n")
    return TableReport(name, len(ids), heads, layers, folder / JSON_FILE, folder / PNG_FILE)
