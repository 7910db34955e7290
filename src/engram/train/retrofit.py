"""Settings of retrofit training (:func:`engram.hf.retrofit_train.train_retrofit`, ``engram retrofit``).

They live apart from :mod:`engram.hf` so that the command line can build its flags without importing
transformers (optional, and slow to import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_STEPS = 200
DEFAULT_LR = 3e-3  # of the dense Engram weights; the tables train at table_lr_mult times this (engram.train.optim)


@dataclass
class RetrofitConfig:
    """Settings of :func:`~engram.hf.retrofit_train.train_retrofit`; every field is a flag of ``engram retrofit``
    (:mod:`engram.cli.flags`)."""

    model: str = field(metadata={  # only read; loaded with local_files_only
        "help": "the base model: a local transformers folder (config, weights, tokenizer.json)"})
    layers: list[int] = field(metadata={"help": "0-based decoder layers that get an Engram layer before them"})
    out: str = field(metadata={"help": "the adapter folder to write"})
    # what ``engram train --data`` takes, tokenised with the base model's own tokenizer.json
    data: list[str] = field(metadata={
        "help": "presets, raw files/folders or a prepared corpus (tokenised with the model's tokenizer)"})
    steps: int = DEFAULT_STEPS  # optimiser steps, each on batch_size windows of seq_len tokens of the train split
    batch_size: int = 8
    seq_len: int = 128
    lr: float = field(default=DEFAULT_LR, metadata={  # AdamW; warm-up over a tenth of the steps, then cosine
        "help": "peak learning rate of the dense Engram weights (tables: 5x, sparse Adam)"})
    seed: int = 0  # the Engram layers' initialisation and the batch order
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda:1"...
    eval_batches: int = 4  # held-out batches of the validation split, scored before and after
    export: str | None = field(default=None, metadata={  # Llama family only: checked before training starts
        "help": "also write the trained model as an EngramLM folder (Llama family), for engram serve and engram tune"})
    progress: bool = True  # a progress bar while training (the summary prints either way)

    def __post_init__(self) -> None:
        self.data = [str(self.data)] if isinstance(self.data, (str, os.PathLike)) else [str(d) for d in self.data]
        if not self.data:
            raise ValueError("data must name at least one source or a prepared corpus")
        self.layers = list(self.layers)
        if not self.layers:
            raise ValueError("layers must name at least one decoder layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeat a layer")
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
