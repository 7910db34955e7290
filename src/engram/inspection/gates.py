"""`engram inspect gates`: the gate of every token, Engram layer and residual branch, as a page and a picture.

The gate alpha (docs/design.md §4) says how much of the memory read for the last n tokens reaches each residual
branch: near 1 on n-grams the tables learned, near 0 where the retrieved row does not fit the context
(hash collisions, other senses). Writes ``gates.html`` (self-contained), ``gates.png`` and ``gates.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from engram.atomic import atomic_write_text
from engram.data.corpus import bos_id
from engram.inspection.gate_page import render_gate_page, shown_text
from engram.inspection.hooks import engram_blocks, recorded_gates
from engram.inspection.loading import (TokenPiece, checkpoint_folder, load_model, model_tokenizer, output_folder,
                                       text_ids, token_pieces)
from engram.inspection.plotting import GATE_CMAP, Figure, choose_fonts, figure_style, save_figure
from engram.model import EngramLM

HTML_FILE = "gates.html"
PNG_FILE = "gates.png"
JSON_FILE = "gates.json"
_TOKENS_PER_ROW = 40  # tokens per heatmap strip of the PNG


@dataclass
class TextGates:
    """The gates of one text."""

    text: str
    pieces: list[TokenPiece]  # one per token of the text (the BOS read before it is left out)
    gates: np.ndarray  # float32 [T, L, M]: token t, Engram layer l (layer_ids order), residual branch m; in [0, 1]


@dataclass
class GatesReport:
    """What :func:`run_gates` computed and wrote."""

    checkpoint: str
    layer_ids: list[int]
    texts: list[TextGates]
    html: Path
    png: Path
    summary: Path
    font_note: str | None  # set when the PNG lacks glyphs for some characters (no font for them here)


@torch.no_grad()
def text_gates(model: EngramLM, tokenizer: Tokenizer, text: str) -> TextGates:
    """Run ``text`` (after a BOS, as training documents start) through ``model`` and keep its gates.

    Example:
        >>> gates = text_gates(model, model_tokenizer(model), "Alexander the Great")   # doctest: +SKIP
        >>> gates.gates.shape                                   # [tokens, Engram layers, hc_mult]
        (4, 1, 4)
    """
    ids = text_ids(model, tokenizer, text, bos_id(tokenizer))
    with recorded_gates(model) as recorded:
        model(torch.tensor([ids], device=model.embed.weight.device))
    layers = [block.layer_idx for block in engram_blocks(model)]
    gates = np.stack([recorded[layer][0][0, 1:].numpy() for layer in layers], axis=1)  # [T, L, M]
    return TextGates(text, token_pieces(tokenizer, ids[1:]), gates.astype(np.float32))


def plot_gates(texts: list[TextGates], layer_ids: list[int], path: Path) -> str | None:
    """Heatmap strips (rows: layer x branch; columns: tokens) per text into ``path``; returns the font note.

    Spaces in token labels are drawn as ``␣`` so that ``" the"`` and ``"the"`` differ.
    """
    labels = [[shown_text(p.text).replace(" ", "␣") + (f" {p.part}/{p.parts}" if p.parts > 1 else "")
               for p in t.pieces] for t in texts]
    fonts = choose_fonts(label for text_labels in labels for label in text_labels)
    strips = [(i, start) for i, t in enumerate(texts) for start in range(0, len(t.pieces), _TOKENS_PER_ROW)]
    branches = texts[0].gates.shape[2]
    rows = len(layer_ids) * branches
    columns = min(_TOKENS_PER_ROW, max(len(t.pieces) for t in texts))
    row_names = [f"block {layer} · branch {m}" for layer in layer_ids for m in range(branches)]
    with figure_style(fonts):
        fig = Figure(figsize=(max(6.0, 2.0 + 0.27 * columns), (0.2 * rows + 1.7) * len(strips) + 0.3), dpi=100,
                     layout="constrained")
        axes = fig.subplots(len(strips), 1, squeeze=False)
        image = None
        for ax, (i, start) in zip(axes[:, 0], strips):
            gates = texts[i].gates[start:start + columns].reshape(-1, rows).T  # [rows, tokens]
            padded = np.full((rows, columns), np.nan)
            padded[:, :gates.shape[1]] = gates
            image = ax.imshow(padded, cmap=GATE_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(gates.shape[1]), labels[i][start:start + columns], rotation=90, fontsize=9)
            ax.set_yticks(range(rows), row_names, fontsize=7)
            ax.tick_params(length=0)
            if start == 0:
                title = texts[i].text if len(texts[i].text) <= 90 else texts[i].text[:87] + "..."
                ax.set_title(shown_text(title), loc="left", fontsize=10)
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01, label="gate α")
        save_figure(fig, path, fonts.note)
    return fonts.note


def run_gates(checkpoint: str | os.PathLike[str], texts: list[str], out: str | os.PathLike[str],
              device: str = "auto") -> GatesReport:
    """Gates of ``texts`` under the model of ``checkpoint``, written into ``out`` (page, PNG, JSON)."""
    if not texts:
        raise ValueError("give at least one text")
    folder = output_folder(out)
    model = load_model(checkpoint, device)
    tokenizer = model_tokenizer(model)
    layer_ids = [block.layer_idx for block in engram_blocks(model)]
    results = [text_gates(model, tokenizer, text) for text in texts]
    name = str(checkpoint_folder(checkpoint))
    atomic_write_text(folder / HTML_FILE, render_gate_page(
        [(t.text, t.pieces, t.gates) for t in results], layer_ids, f"Engram gates: {name}"))
    note = plot_gates(results, layer_ids, folder / PNG_FILE)
    summary = {
        "checkpoint": name, "layer_ids": layer_ids, "hc_mult": model.cfg.hc_mult, "font_note": note,
        "texts": [{"text": t.text, "token_ids": [p.token_id for p in t.pieces], "tokens": [p.label for p in t.pieces],
                   "gates": np.round(t.gates, 5).tolist(), "mean_gate": float(t.gates.mean())} for t in results],
    }
    atomic_write_text(folder / JSON_FILE, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return GatesReport(name, layer_ids, results, folder / HTML_FILE, folder / PNG_FILE, folder / JSON_FILE, note)
