"""`engram inspect ablate`: validation loss with Engram on, and with its output zeroed at inference.

Both passes read the same windows; the only change is a forward hook that makes every Engram layer add
zeros. The per-token losses are broken down by what is predicted:

* **in a frequent n-gram**: the target token completes one of the ``top_ngrams`` most frequent n-grams
  (orders 2..max_ngram_size) of the training split, i.e. it and the n-1 tokens before it form that n-gram.
  Counted over the first ``ngram_tokens`` tokens of the training split; n-grams holding BOS (they straddle
  two documents) and n-grams seen once are not counted.
* **word start / continuation**: a target *continues a word* when its text begins with a word character
  (letter, digit, ``_``, or a partial UTF-8 byte) and the token before it ends with one; otherwise it
  *starts a word* (a space, punctuation or a line break is at the boundary). Byte-level tokenizers carry
  the space in the token (``" the"``), which is what this rule reads. Scripts written without spaces
  (Chinese) count as one long word.

Writes ``ablate.json`` and ``ablate.png`` into ``out``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from engram.atomic import atomic_write_text
from engram.inspection.gate_page import shown_text
from engram.inspection.hooks import zeroed_engram
from engram.inspection.loading import (check_positive, checkpoint_folder, eval_batches, model_corpus, model_tokenizer,
                                       open_inspection)
from engram.inspection.ngrams import FrequentNgrams, frequent_ngrams, ngram_keys
from engram.inspection.plotting import Figure, choose_fonts, figure_style, save_figure
from engram.model import EngramLM

JSON_FILE = "ablate.json"
PNG_FILE = "ablate.png"


class _OnOff:
    loss_on: float
    loss_off: float

    @property
    def increase(self) -> float:
        """What zeroing Engram's output costs, in nats."""
        return self.loss_off - self.loss_on


@dataclass
class CategoryLoss(_OnOff):
    """Mean next-token loss (nats) of the targets of one category, Engram on and off."""

    name: str
    tokens: int
    loss_on: float
    loss_off: float


@dataclass
class TokenLoss(_OnOff):
    """Mean loss of one target token id over its occurrences, Engram on and off."""

    token_id: int
    text: str
    count: int
    loss_on: float
    loss_off: float


@dataclass
class AblationReport:
    """What :func:`run_ablate` computed and wrote; ``categories[0]`` is every target."""

    checkpoint: str
    categories: list[CategoryLoss]
    top_tokens: list[TokenLoss]
    frequent_ngrams: dict[int, int]  # order -> n-grams that define "in a frequent n-gram"
    summary: Path
    png: Path
    font_note: str | None  # set when the PNG lacks glyphs for some token text (no font for them here)


@torch.no_grad()
def target_losses(model: EngramLM, batches: list[tuple[torch.Tensor, torch.Tensor]], ablate: bool = False
                  ) -> np.ndarray:
    """float64 ``[windows, T]`` cross entropy of every target, with Engram zeroed when ``ablate``."""
    losses = []
    for inputs, targets in batches:
        with zeroed_engram(model) if ablate else contextlib.nullcontext():
            loss = model(inputs, targets=targets, loss_reduction="none").loss
        losses.append(loss.double().cpu().numpy())
    return np.concatenate(losses)


def in_frequent_ngram(windows: np.ndarray, frequent: list[FrequentNgrams]) -> np.ndarray:
    """bool ``[W, T]``: target ``j`` of window ``w`` (token ``windows[w, j + 1]``) completes a frequent n-gram.

    ``windows`` is int64 ``[W, T + 1]`` (inputs then the last target); an n-gram must lie inside the window.
    """
    length = windows.shape[1] - 1
    inside = np.zeros((len(windows), length), dtype=bool)
    for ngrams in frequent:
        n = ngrams.order
        if n - 1 > length:
            continue
        keys = ngram_keys(windows, n, ngrams.base)  # [W, T + 2 - n]: entry i ends at token i + n - 1
        inside[:, n - 2:] |= np.isin(keys, ngrams.keys)
    return inside


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in "_\ufffd"


def starts_word(previous: str, current: str) -> bool:
    """Whether a token with text ``current`` after one with text ``previous`` begins a word (module docstring)."""
    return not (current and previous and _is_word_char(current[0]) and _is_word_char(previous[-1]))


def word_starts(windows: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """bool ``[W, T]``: target ``j`` (token ``windows[w, j + 1]``) starts a word, by :func:`starts_word`."""
    texts = {int(i): tokenizer.decode([int(i)], skip_special_tokens=False) for i in np.unique(windows)}
    return np.array([[starts_word(texts[int(a)], texts[int(b)]) for a, b in zip(row[:-1], row[1:])]
                     for row in windows], dtype=bool).reshape(len(windows), windows.shape[1] - 1)


def category_losses(on: np.ndarray, off: np.ndarray, in_ngram: np.ndarray, word_start: np.ndarray
                    ) -> list[CategoryLoss]:
    """Mean losses over all targets, each category and each pair of categories (empty ones left out)."""
    masks = {
        "all": np.ones_like(in_ngram),
        "in a frequent n-gram": in_ngram,
        "not in a frequent n-gram": ~in_ngram,
        "word start": word_start,
        "word continuation": ~word_start,
        "in n-gram, word start": in_ngram & word_start,
        "in n-gram, continuation": in_ngram & ~word_start,
        "not in n-gram, word start": ~in_ngram & word_start,
        "not in n-gram, continuation": ~in_ngram & ~word_start,
    }
    return [CategoryLoss(name, int(mask.sum()), float(on[mask].mean()), float(off[mask].mean()))
            for name, mask in masks.items() if mask.any()]


def token_losses(targets: np.ndarray, on: np.ndarray, off: np.ndarray, tokenizer: Tokenizer, top: int,
                 min_count: int) -> list[TokenLoss]:
    """The ``top`` target ids (seen at least ``min_count`` times) whose mean loss rises most without Engram."""
    ids, inverse, counts = np.unique(targets.ravel(), return_inverse=True, return_counts=True)
    sum_on = np.bincount(inverse, weights=on.ravel(), minlength=len(ids))
    sum_off = np.bincount(inverse, weights=off.ravel(), minlength=len(ids))
    eligible = np.flatnonzero(counts >= min_count)
    increase = (sum_off - sum_on)[eligible] / counts[eligible]
    chosen = eligible[np.argsort(-increase, kind="stable")[:top]]
    return [TokenLoss(int(ids[i]), tokenizer.decode([int(ids[i])], skip_special_tokens=False), int(counts[i]),
                      float(sum_on[i] / counts[i]), float(sum_off[i] / counts[i])) for i in chosen]


def plot_ablation(categories: list[CategoryLoss], top_tokens: list[TokenLoss], path: Path, title: str
                  ) -> str | None:
    """Loss increase per category (left) and the tokens that lose most (right) into ``path``; the font note."""
    labels = [repr(shown_text(t.text)) for t in top_tokens]
    fonts = choose_fonts(labels)
    with figure_style(fonts):
        fig = Figure(figsize=(13, 5.2), dpi=100, layout="tight")
        left, right = fig.subplots(1, 2)
        positions = np.arange(len(categories))[::-1]
        increases = [c.increase for c in categories]
        left.barh(positions, increases, color=["tab:red" if v >= 0 else "tab:green" for v in increases])
        left.set_yticks(positions, [f"{c.name} ({c.tokens:,})\n{c.loss_on:.3f} → {c.loss_off:.3f}"
                                    for c in categories], fontsize=8)
        left.axvline(0.0, color="black", lw=0.8)
        left.set_xlabel("loss increase when Engram's output is zeroed (nats / token)")
        left.set_title("by target category (targets; loss on → off)", fontsize=10)
        left.grid(axis="x", alpha=0.3)
        rows = np.arange(len(top_tokens))[::-1]
        right.barh(rows, [t.increase for t in top_tokens], color="tab:red")
        right.set_yticks(rows, [f"{label} ×{t.count}" for label, t in zip(labels, top_tokens)], fontsize=8)
        right.set_xlabel("mean loss increase without Engram (nats)")
        right.set_title("target tokens that lose most", fontsize=10)
        right.grid(axis="x", alpha=0.3)
        fig.suptitle(title, fontsize=11)
        save_figure(fig, path, fonts.note)
    return fonts.note


def run_ablate(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], data: list[str] | None = None,
               device: str = "auto", batches: int = 16, batch_size: int = 8, seq_len: int = 256,
               top_ngrams: int = 1000, ngram_tokens: int = 2_000_000, top_tokens: int = 20, min_count: int = 5
               ) -> AblationReport:
    """Validation loss with and without Engram, by category, written into ``out`` (JSON, PNG).

    Args:
        data: as ``engram train --data``; default: the data of the run that wrote ``checkpoint``.
        batches, batch_size, seq_len: the validation windows (consecutive, from the start of the split).
        top_ngrams: n-grams per order that count as frequent.
        ngram_tokens: training-split tokens counted for them.
        top_tokens, min_count: how many most-hurt target tokens to list, among those seen that often.
    """
    check_positive(top_ngrams=top_ngrams, ngram_tokens=ngram_tokens, top_tokens=top_tokens, min_count=min_count)
    folder, data, model = open_inspection(checkpoint, out, data, device)
    tokenizer = model_tokenizer(model)
    corpus = model_corpus(model, data)
    val_batches = eval_batches(model, corpus, batch_size, seq_len, batches)
    sample = np.asarray(corpus.tokens("train")[:ngram_tokens], dtype=np.int64)
    frequent = [frequent_ngrams(sample, n, top_ngrams, model.cfg.vocab_size, exclude=corpus.info.bos_id)
                for n in range(2, model.cfg.engram.max_ngram_size + 1)]
    on, off = target_losses(model, val_batches), target_losses(model, val_batches, ablate=True)
    sequences = np.concatenate([torch.cat([i[:, :1], t], dim=1).cpu().numpy() for i, t in val_batches])  # [W, T+1]
    categories = category_losses(on, off, in_frequent_ngram(sequences, frequent), word_starts(sequences, tokenizer))
    losers = token_losses(sequences[:, 1:], on, off, tokenizer, top_tokens, min_count)
    name = str(checkpoint_folder(checkpoint))
    note = plot_ablation(categories, losers, folder / PNG_FILE,
                         f"Engram ablation at inference: {name} ({on.size:,} validation targets)")
    summary = {
        "checkpoint": name, "data": data, "targets": int(on.size), "font_note": note,
        "frequent_ngrams": {str(f.order): len(f) for f in frequent}, "ngram_tokens": int(len(sample)),
        "categories": [{**asdict(c), "increase": c.increase} for c in categories],
        "top_tokens": [{**asdict(t), "increase": t.increase} for t in losers],
    }
    atomic_write_text(folder / JSON_FILE, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return AblationReport(name, categories, losers, {f.order: len(f) for f in frequent}, folder / JSON_FILE,
                          folder / PNG_FILE, note)
