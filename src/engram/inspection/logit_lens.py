"""`engram inspect logit-lens`: how close each depth's prediction is to the model's final one.

After every block the residual streams are read out as the model reads its last ones: streams merged
(the learned mix with mHC), final RMSNorm, LM head. The KL divergence KL(final || depth) averaged over
validation tokens says how much of the final prediction is already there; depth 0 is the embedding, depth
k the output of block k-1, and the last depth is the model's output (KL 0). The paper reads a faster fall
for an Engram model as its early layers being freed from rebuilding n-gram patterns. Writes
``logit_lens.json`` and ``logit_lens.png`` into ``out``, one curve per model (``--baseline`` adds one).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engram.atomic import atomic_write_text
from engram.inspection.hooks import recorded_residuals
from engram.inspection.loading import (checkpoint_folder, eval_batches, load_model, model_corpus, output_folder,
                                       resolve_data)
from engram.inspection.plotting import Figure, choose_fonts, figure_style, save_figure
from engram.model import EngramLM

JSON_FILE = "logit_lens.json"
PNG_FILE = "logit_lens.png"


@dataclass
class LensCurve:
    """The logit lens of one model, one value per depth (``n_layers + 1``: the embedding, then each block)."""

    name: str
    checkpoint: str
    engram_layers: list[int]  # blocks holding an Engram (0-based); empty for a baseline
    tokens: int  # validation positions averaged over
    kl: list[float]  # mean KL(final || depth), nats
    loss: list[float]  # mean next-token cross entropy of the depth's prediction, nats
    top1_agreement: list[float]  # share of positions whose top-1 token equals the final one


@dataclass
class LogitLensReport:
    """What :func:`run_logit_lens` computed and wrote."""

    curves: list[LensCurve]
    summary: Path
    png: Path


@torch.no_grad()
def logit_lens(model: EngramLM, batches: list[tuple[torch.Tensor, torch.Tensor]], name: str = "model",
               checkpoint: str = "") -> LensCurve:
    """The lens curve of ``model`` over ``batches`` of int64 ``[B, T]`` (inputs, targets) pairs."""
    depths = model.cfg.n_layers + 1
    kl, loss, agree = np.zeros(depths), np.zeros(depths), np.zeros(depths)
    tokens = 0
    for inputs, targets in batches:
        with recorded_residuals(model) as streams:
            final = model(inputs).logits
        log_final = final.log_softmax(-1)
        top_final = final.argmax(-1)
        for depth, stream in enumerate(streams):
            logits = model.readout(stream)
            kl[depth] += float(F.kl_div(logits.log_softmax(-1), log_final, log_target=True, reduction="sum"))
            loss[depth] += float(F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
            agree[depth] += float((logits.argmax(-1) == top_final).sum())
        tokens += inputs.numel()
    engram_layers = [block.layer_idx for block in model.blocks if block.engram is not None]
    return LensCurve(name, checkpoint, engram_layers, tokens, (kl / tokens).tolist(), (loss / tokens).tolist(),
                     (agree / tokens).tolist())


def plot_logit_lens(curves: list[LensCurve], path: Path) -> str | None:
    """KL to the final prediction (left) and the lens's own loss (right) against depth, into ``path``."""
    fonts = choose_fonts(c.name for c in curves)
    with figure_style(fonts):
        fig = Figure(figsize=(12, 4.6), dpi=100, layout="tight")
        left, right = fig.subplots(1, 2)
        for curve, colour in zip(curves, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            depths = np.arange(len(curve.kl))
            label = curve.name + (f" (Engram at block {', '.join(map(str, curve.engram_layers))})"
                                  if curve.engram_layers else "")
            for ax, values in ((left, curve.kl), (right, curve.loss)):
                ax.plot(depths, values, "o-", color=colour, label=label)
                for layer in curve.engram_layers:  # the Engram acts at the start of its block: before depth layer+1
                    ax.plot([layer + 1], [values[layer + 1]], marker="*", markersize=14, color=colour)
        ticks = max(len(c.kl) for c in curves)
        for ax, ylabel in ((left, "KL(final || lens), nats / token"), (right, "next-token loss of the lens, nats")):
            ax.set_xticks(range(ticks), ["embed"] + [f"block {k}" for k in range(ticks - 1)], rotation=30)
            ax.set_xlabel("residual stream after")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        left.set_title("distance to the final prediction (★: block with Engram)", fontsize=10)
        right.set_title("how well each depth predicts on its own", fontsize=10)
        save_figure(fig, path, fonts.note)
    return fonts.note


def run_logit_lens(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                   baseline: str | os.PathLike[str] | None = None, data: list[str] | None = None,
                   device: str = "auto", batches: int = 8, batch_size: int = 8, seq_len: int = 256
                   ) -> LogitLensReport:
    """The logit lens of ``checkpoint`` (and of ``baseline``) on the same validation text, into ``out``.

    ``data`` as ``engram train --data``; default: the data of the run that wrote ``checkpoint``. Each model
    reads it through its own tokenizer.
    """
    folder = output_folder(out)
    data = resolve_data(checkpoint, data)
    curves = []
    for name, path in (("engram", checkpoint), ("baseline", baseline)):
        if path is None:
            continue
        model = load_model(path, device)
        windows = eval_batches(model, model_corpus(model, data), batch_size, seq_len, batches)
        if name == "engram" and model.hasher is None:
            name = "model without Engram"
        curves.append(logit_lens(model, windows, name, str(checkpoint_folder(path))))
    note = plot_logit_lens(curves, folder / PNG_FILE)
    summary = {"data": data, "font_note": note, "curves": [asdict(c) for c in curves]}
    atomic_write_text(folder / JSON_FILE, json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return LogitLensReport(curves, folder / JSON_FILE, folder / PNG_FILE)
