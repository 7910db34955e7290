"""Memory-only fine-tuning: train a saved model's Engram tables on new text, backbone frozen, into a patch.

Every parameter is frozen except the Engram tables (and, with ``train_gates``, each Engram module's value/key
projection and gate norms). Tables train with sparse gradients and ``SparseAdam``, so a row no batch reads stays
bit-identical; the model runs in eval mode, so no other state (MoE load statistics) moves either. The result is
the :func:`engram.memory.diff` of the tuned model against the base: a :class:`~engram.memory.MemoryPatch` of the
rows that changed, saved beside its base's fingerprint.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from engram.data.batches import TokenBatches, token_byte_lengths, validation_batches
from engram.data.corpus import Corpus, load_or_prepare
from engram.memory.patch import MemoryPatch, diff, engram_tables, save_patch
from engram.model import EngramLM
from engram.parallel.distributed import resolve_device
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables
from engram.train.steps import run_steps
from engram.train.trainer import evaluate_loss, lm_loss

DEFAULT_STEPS = 200
DEFAULT_LR = 3e-2  # of the tables; the gate projections train at lr / table_lr_mult (the paper's ratio)


def freeze_for_memory_tuning(model: EngramLM, train_gates: bool = False) -> list[str]:
    """Freeze every parameter of ``model`` except its Engram tables (and, with ``train_gates``, each Engram
    module's ``value_key_proj``, ``key_norm`` and ``query_norm``); returns the names left trainable."""
    model.requires_grad_(False)
    for block in model.blocks:
        if block.engram is None:
            continue
        block.engram.multi_head_embedding.requires_grad_(True)
        if train_gates:
            for module in (block.engram.value_key_proj, block.engram.key_norm, block.engram.query_norm):
                module.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _eval_sets(corpora: dict[str, Corpus], batch_size: int, seq_len: int, eval_batches: int,
               console: Console) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Validation windows of each corpus whose validation split holds one window at least."""
    sets = {}
    for name, corpus in corpora.items():
        tokens = corpus.tokens("val")
        if len(tokens) < seq_len + 1:
            console.print(f"{name}: validation split of {len(tokens)} tokens is shorter than one window of "
                          f"{seq_len + 1}; its loss is not measured")
            continue
        sets[name] = validation_batches(tokens, batch_size, seq_len, eval_batches)
    return sets


def _spec(data: str | os.PathLike[str] | list[str]) -> list[str]:
    """A data spec as the list of strings ``load_or_prepare`` takes (and a patch's metadata records)."""
    return [str(data)] if isinstance(data, (str, os.PathLike)) else [str(entry) for entry in data]


@dataclass
class TuneConfig:
    """Settings of :func:`tune_memory`; every field is a flag of ``engram tune`` (:mod:`engram.cli.flags`)."""

    checkpoint: str = field(metadata={  # only read
        "help": "the base model: a save_pretrained folder (e.g. RUN/final)"})
    # what ``engram train --data`` takes, tokenised with the base model's tokenizer (a prepared corpus must have
    # been prepared with it); a single path is taken as a list of one
    data: list[str] = field(metadata={
        "help": "presets, raw files/folders or a prepared corpus (tokenised with the base's tokenizer)"})
    out: str = field(metadata={"help": "the patch file to write (e.g. NAME.patch)"})  # see engram.memory.patch
    steps: int = DEFAULT_STEPS  # optimiser steps, each on batch_size windows of seq_len tokens of the train split
    lr: float = field(default=DEFAULT_LR, metadata={  # SparseAdam; warm-up over a tenth of the steps, then cosine
        "help": "peak learning rate of the tables"})
    # also each Engram module's value/key projection and gate norms (AdamW at lr / table_lr_mult): the patch then
    # carries those tensors and cannot be served as an overlay
    train_gates: bool = field(default=False, metadata={
        "help": "also train the Engram value/key projections and gate norms (the patch must be applied, not served "
                "as an overlay)"})
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0  # the batch order: batch s is a function of seed and s
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda:1"...
    # measured before and after beside data's own; the losses land in patch.metadata["val_loss"]
    eval_data: list[str] | None = field(default=None, metadata={
        "help": "a second data spec (e.g. general text) whose validation loss is reported before/after"})
    eval_batches: int = 8  # validation batches per data set
    progress: bool = True  # a progress bar while tuning (the summary prints either way)

    def __post_init__(self) -> None:
        self.data = _spec(self.data)
        if self.eval_data is not None:
            self.eval_data = _spec(self.eval_data)
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def tune_memory(cfg: TuneConfig) -> MemoryPatch:
    """Tune the Engram tables of the model saved in ``cfg.checkpoint`` on ``cfg.data``; save the patch into
    ``cfg.out`` and return it: the rows that differ from the base, the base's fingerprint, and metadata (settings,
    losses).

    Example:
        >>> cfg = TuneConfig("runs/tiny/final", ["notes.txt"], "notes.patch", steps=100)
        >>> patch = tune_memory(cfg)  # doctest: +SKIP
    """
    console = Console()
    resolved = resolve_device(cfg.device)
    base = EngramLM.from_pretrained(cfg.checkpoint)
    engram_tables(base)  # refuses a model without Engram
    if cfg.seq_len > base.cfg.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{base.cfg.max_position_embeddings}")
    model = copy.deepcopy(base)  # the copy trains; ``base`` stays to diff against
    trainable = freeze_for_memory_tuning(model, cfg.train_gates)
    enable_sparse_tables(model)
    model.to(resolved).eval()
    corpora = {"domain": load_or_prepare(cfg.data, tokenizer=model.cfg.tokenizer, progress=cfg.progress)}
    if cfg.eval_data is not None:
        corpora["general"] = load_or_prepare(cfg.eval_data, tokenizer=model.cfg.tokenizer, progress=cfg.progress)
    eval_sets = _eval_sets(corpora, cfg.batch_size, cfg.seq_len, cfg.eval_batches, console)
    token_bytes = torch.from_numpy(token_byte_lengths(model.cfg.tokenizer)).to(resolved)
    autocast = resolved.type == "cuda"
    before = {name: evaluate_loss(model, windows, token_bytes, resolved, autocast)["val_loss"]
              for name, windows in eval_sets.items()}

    mult = OptimConfig.table_lr_mult
    optimizer = EngramOptimizer(model, OptimConfig(lr=cfg.lr / mult, table_lr_mult=mult, weight_decay=0.0,
                                                   warmup_steps=max(1, cfg.steps // 10)))
    train_batches = TokenBatches(corpora["domain"].tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed)
    def step_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, inputs.to(resolved), targets.to(resolved), autocast)[0]

    loss_value = run_steps(optimizer, train_batches, cfg.steps, step_loss, "tuning memory", console, cfg.progress)
    after = {name: evaluate_loss(model, windows, token_bytes, resolved, autocast)["val_loss"]
             for name, windows in eval_sets.items()}

    changed = diff(base, model)
    metadata: dict[str, Any] = {
        "kind": "tune", "data": cfg.data, "eval_data": cfg.eval_data, "steps": cfg.steps, "lr": cfg.lr,
        "train_gates": cfg.train_gates, "trained": trainable, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
        "seed": cfg.seed, "final_loss": loss_value,
        "val_loss": {name: {"before": before[name], "after": after[name]} for name in eval_sets},
    }
    patch = MemoryPatch(changed.layers, changed.base_fingerprint, changed.dense, metadata)
    save_patch(patch, cfg.out)
    console.print(f"{patch.num_rows:,} rows changed in {len(patch.layers)} layer(s)"
                  + (f", {len(patch.dense)} dense tensors" if patch.dense else "") + f": patch written to {cfg.out}")
    for name in eval_sets:
        console.print(f"{name} validation loss: {before[name]:.4f} -> {after[name]:.4f}")
    return patch
