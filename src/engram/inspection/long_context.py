"""`engram eval`: what checkpoints make of their context, side by side.

Two measurements per checkpoint (docs/results/allocation-v2: does memory free attention for global context?):

* **Loss by position**: consecutive validation windows of ``seq_len`` tokens (as training's validation reads them);
  the loss of every target by how many tokens of context its prediction saw (1 .. ``seq_len``), averaged in
  power-of-two buckets ``[1, 2), [2, 4), [4, 8), ...``. The token-weighted mean over the buckets is the usual
  validation loss of those windows.
* **Retrieval**: a key planted early, asked for late. Each sequence of ``length`` tokens is
  ``BOS, m1, m2, k1..kK, filler..., m1, m2, k1..kK``: a random two-token marker and ``K`` random key tokens (drawn
  from the tokens of the validation split), validation text as filler, then the marker and key again. Scored is the
  prediction of each key token at the end (teacher forced: ``k_i`` given everything before it): accuracy (the
  argmax is the planted token), accuracy of the first key token alone (nothing but the marker says what comes), and
  the mean loss of the key tokens. The key is random, so n-gram statistics cannot predict it: only reading back
  to the planted copy, ``length - K - 3`` tokens before (``distance``), can; chance is about ``1 / len(pool)``.

Writes ``eval.json`` (settings and every number) and ``eval.png`` (both measurements, one line per checkpoint).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.atomic import atomic_write_text
from engram.data.corpus import Corpus
from engram.inspection.loading import eval_batches, load_model, model_corpus, output_folder, resolve_data
from engram.model import EngramLM
from engram.train.checkpoint import checkpoint_folder
from engram.train.sweep_report import finish_plot, pyplot
from engram.train.trainer import lm_loss

JSON_FILE = "eval.json"
PNG_FILE = "eval.png"
MARKER_TOKENS = 2

# (inputs [B, T], targets [B, T]) -> per-target losses [B, T]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (ids [N, L], keep) -> logits of the last `keep` positions [N, keep, V]
LogitsFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class EvalConfig:
    """What ``engram eval`` measures. Every field is a flag (:mod:`engram.cli.flags`)."""

    checkpoint: list[str] = field(metadata={
        "metavar": "CHECKPOINT", "help": "model folders (a run's final/) or run folders, compared in one plot"})
    out: str = field(metadata={"help": "folder to write eval.json and eval.png into (created when missing)"})
    data: list[str] | None = field(default=None, metadata={
        "metavar": "SOURCE", "help": "presets, raw files/folders or a prepared corpus, read with the checkpoints' "
                                     "tokenizer (default: the data of the run that wrote the first checkpoint)"})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda:0', ..."})
    seq_len: int | None = field(default=None, metadata={
        "help": "tokens per window of the loss by position (default: the checkpoints' max_position_embeddings)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward (default: %(default)s)"})
    batches: int = field(default=16, metadata={
        "help": "validation batches of the loss by position (default: %(default)s)"})
    lengths: list[int] | None = field(default=None, metadata={
        "metavar": "LENGTH", "help": "context lengths of the retrieval task (default: seq_len / 8, / 4, / 2, seq_len)"})
    samples: int = field(default=64, metadata={"help": "retrieval sequences per length (default: %(default)s)"})
    key_tokens: int = field(default=4, metadata={"help": "tokens of each planted key (default: %(default)s)"})
    seed: int = field(default=0, metadata={"help": "seed of the keys, markers and filler (default: %(default)s)"})

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint must name at least one model")
        for name in ("batch_size", "batches", "samples", "key_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        shortest = min_retrieval_length(self.key_tokens)
        bad = [length for length in self.lengths or [] if length < shortest]
        if bad:
            raise ValueError(f"retrieval lengths must be >= {shortest} (BOS, marker and key twice, one filler token) "
                             f"with key_tokens={self.key_tokens}, got {bad[0]}")


def min_retrieval_length(key_tokens: int) -> int:
    """The shortest retrieval sequence: BOS, marker and key twice, one filler token."""
    return 2 * (MARKER_TOKENS + key_tokens) + 2


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of context sizes ``1 .. seq_len`` in powers of two (the last one cut at
    ``seq_len + 1``)."""
    buckets, start = [], 1
    while start <= seq_len:
        buckets.append((start, min(2 * start, seq_len + 1)))
        start *= 2
    return buckets


def loss_by_position(loss_fn: LossFn, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    """Mean loss of the targets of ``batches`` (int64 ``[B, T]`` pairs) in every :func:`position_buckets` bucket of
    their context size (target ``t`` of a window sees ``t + 1`` tokens): ``{"start", "end", "tokens", "loss"}``."""
    seq_len = batches[0][0].shape[1]
    sums, counts = torch.zeros(seq_len, dtype=torch.float64), torch.zeros(seq_len, dtype=torch.int64)
    for inputs, targets in batches:
        losses = loss_fn(inputs, targets).double().cpu()  # [B, T]
        sums += losses.sum(0)
        counts += losses.shape[0]
    rows = []
    for start, end in position_buckets(seq_len):
        tokens = int(counts[start - 1:end - 1].sum())
        rows.append({"start": start, "end": end, "tokens": tokens,
                     "loss": float(sums[start - 1:end - 1].sum()) / tokens})
    return rows


def retrieval_sequences(filler: np.ndarray, pool: np.ndarray, length: int, samples: int, key_tokens: int,
                        bos: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` retrieval sequences of ``length`` tokens (module docstring) and their keys.

    Args:
        filler: token ids to cut the filler from (a random stretch each).
        pool: token ids markers and keys are drawn from (without repeats inside one sequence's marker and key).
    Returns:
        ``(ids [samples, length], keys [samples, key_tokens])``, int64.
    """
    planted = MARKER_TOKENS + key_tokens
    gap = length - 1 - 2 * planted
    if gap < 1:
        raise ValueError(f"length {length} leaves no filler: it must be >= {min_retrieval_length(key_tokens)}")
    if len(filler) < gap:
        raise ValueError(f"the validation split holds {len(filler)} tokens, fewer than the {gap} of filler a "
                         f"length-{length} retrieval sequence needs")
    ids = np.empty((samples, length), dtype=np.int64)
    for row in ids:
        planted_ids = rng.choice(pool, size=planted, replace=False)
        start = rng.integers(0, len(filler) - gap + 1)
        row[:] = np.concatenate([[bos], planted_ids, filler[start:start + gap], planted_ids])
    return torch.from_numpy(ids), torch.from_numpy(ids[:, -key_tokens:].copy())


def retrieval_scores(logits_fn: LogitsFn, ids: torch.Tensor, keys: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Accuracy, first-key-token accuracy and mean loss (nats) of predicting ``keys`` ``[N, K]``, the last ``K``
    tokens of ``ids`` ``[N, L]``, each from the tokens before it."""
    key_tokens = keys.shape[1]
    hits, first_hits, nats = 0, 0, 0.0
    for start in range(0, ids.shape[0], batch_size):
        logits = logits_fn(ids[start:start + batch_size], key_tokens + 1)[:, :key_tokens].float().cpu()  # [n, K, V]
        key = keys[start:start + batch_size]
        correct = logits.argmax(-1) == key
        hits += int(correct.sum())
        first_hits += int(correct[:, 0].sum())
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), key.flatten(), reduction="sum"))
    count = ids.shape[0]
    return {"accuracy": hits / (count * key_tokens), "first_token_accuracy": first_hits / count,
            "key_loss": nats / (count * key_tokens)}


def checkpoint_label(checkpoint: str) -> str:
    """A short name for a checkpoint: its run folder's name (``.../rho-0.80/final`` -> ``rho-0.80``)."""
    folder = checkpoint_folder(checkpoint).resolve()
    return folder.parent.name if folder.name == "final" else folder.name


def _model_functions(model: EngramLM) -> tuple[LossFn, LogitsFn]:
    """The per-target losses and the last-positions logits of ``model`` (bf16 autocast on CUDA, as in training)."""
    device, autocast = model.embed.weight.device, model.embed.weight.device.type == "cuda"

    @torch.no_grad()
    def losses(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat, _ = lm_loss(model, inputs.to(device), targets.to(device), autocast, reduction="none")
        return flat.view(inputs.shape)

    @torch.no_grad()
    def logits(ids: torch.Tensor, keep: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model(ids.to(device), logits_to_keep=keep).logits

    return losses, logits


def evaluate_checkpoint(model: EngramLM, corpus: Corpus, cfg: EvalConfig, seq_len: int, lengths: list[int]
                        ) -> dict[str, Any]:
    """Both measurements of one model on ``corpus``'s validation split."""
    loss_fn, logits_fn = _model_functions(model)
    positions = loss_by_position(loss_fn, eval_batches(model, corpus, cfg.batch_size, seq_len, cfg.batches))
    val = np.asarray(corpus.tokens("val"))
    pool = np.unique(val[val != corpus.info.bos_id])
    rng = np.random.default_rng(cfg.seed)  # every checkpoint reads the same sequences
    retrieval = []
    for length in lengths:
        ids, keys = retrieval_sequences(val, pool, length, cfg.samples, cfg.key_tokens, corpus.info.bos_id, rng)
        retrieval.append({"length": length, "distance": length - cfg.key_tokens - MARKER_TOKENS - 1,
                          **retrieval_scores(logits_fn, ids, keys, cfg.batch_size)})
    return {"loss_by_position": positions, "retrieval": retrieval, "chance": 1 / len(pool),
            "val_loss": sum(b["loss"] * b["tokens"] for b in positions) / sum(b["tokens"] for b in positions)}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every checkpoint of ``cfg`` on the same windows and sequences; write ``eval.json`` and ``eval.png``."""
    folder = output_folder(cfg.out)
    data = resolve_data(cfg.checkpoint[0], cfg.data)
    models = {checkpoint_label(c): load_model(c, cfg.device) for c in cfg.checkpoint}
    if len(models) < len(cfg.checkpoint):
        raise ValueError(f"checkpoints {cfg.checkpoint} share a run folder name: name each once")
    seq_len = cfg.seq_len or min(model.cfg.max_position_embeddings for model in models.values())
    too_long = [label for label, model in models.items() if model.cfg.max_position_embeddings < seq_len]
    if too_long:
        raise ValueError(f"seq_len {seq_len} is longer than the max_position_embeddings of {too_long}")
    lengths = cfg.lengths or sorted({max(seq_len // d, min_retrieval_length(cfg.key_tokens)) for d in (8, 4, 2, 1)})
    too_long = [length for length in lengths if length > seq_len]
    if too_long:
        raise ValueError(f"retrieval lengths {too_long} exceed seq_len {seq_len}")
    results = {label: evaluate_checkpoint(model, model_corpus(model, data), cfg, seq_len, lengths)
               for label, model in models.items()}
    report = {"settings": {**asdict(cfg), "data": data, "seq_len": seq_len, "lengths": lengths,
                           "marker_tokens": MARKER_TOKENS},
              "checkpoints": {label: {"checkpoint": str(checkpoint_folder(path)), **result}
                              for (label, result), path in zip(results.items(), cfg.checkpoint)}}
    atomic_write_text(folder / JSON_FILE, json.dumps(report, indent=2) + "\n")
    plot_eval(results, folder / PNG_FILE)
    return report


def bucket_middle(first: int, last: int) -> float:
    """Where a bucket of positions ``first``..``last`` sits on the loss-by-position plot's log axis: their geometric
    middle."""
    return math.sqrt(first * last)


def plot_eval(results: dict[str, dict[str, Any]], out_file: Path) -> Path:
    """Loss by context size (log x) and retrieval accuracy against length, one line per checkpoint."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for label, result in results.items():
        buckets = result["loss_by_position"]
        left.plot([bucket_middle(b["start"], b["end"] - 1) for b in buckets], [b["loss"] for b in buckets], "o-",
                  ms=3, label=label)
        right.plot([r["length"] for r in result["retrieval"]], [r["accuracy"] for r in result["retrieval"]], "o-",
                   ms=4, label=label)
    chance = max(result["chance"] for result in results.values())
    right.axhline(chance, ls=":", color="gray", lw=1, label="chance")
    label_eval_axes(left, right)
    return finish_plot(fig, [left, right], out_file)


def label_eval_axes(left, right, loss_label: str | None = None, note: str = "") -> None:
    """Scales, limits, labels and titles of the two panels of ``eval.png``: loss by position (``left``, y label
    ``loss_label``, the validation loss when ``None``) and retrieval against length (``right``); ``note`` is appended
    to both titles."""
    left.set_xscale("log", base=2)
    left.set_xlabel("tokens of context seen (power-of-two buckets)")
    left.set_ylabel(loss_label or "validation loss (nats / token)")
    left.set_title("Loss by position in the context" + note)
    right.set_xscale("log", base=2)
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("sequence length (the key is planted at its start)")
    right.set_ylabel("key tokens predicted (accuracy)")
    right.set_title("Retrieval of a planted key" + note)
