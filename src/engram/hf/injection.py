"""Knowledge injection into a frozen transformers causal LM through an adapter, and the one training loop every
adapter kind goes through.

- :class:`EngramInjection`: Engram layers before chosen decoder layers (:func:`~engram.hf.retrofit.retrofit`), the
  tables trained with sparse gradients and ``SparseAdam``;
- :class:`LoraInjection`: peft's LoRA (``pip install peft``) on the chosen linear modules.

Both leave the base weights frozen. :func:`train_adapter` trains whatever is left trainable with
:class:`~engram.train.optim.EngramOptimizer` (AdamW for dense weights, ``SparseAdam`` for Engram tables; one LR
schedule) on the same batches, so two adapters trained with the same ``steps`` and batches see the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from engram.config import EngramConfig
from engram.data.batches import TokenBatches
from engram.hf.evaluate import batch_loss
from engram.hf.retrofit import ATTRIBUTE, freeze_base, retrofit, save_adapter
from engram.train.optim import EngramOptimizer, OptimConfig, enable_sparse_tables
from engram.train.steps import run_steps


@dataclass
class EngramInjection:
    """Engram layers before decoder ``layers``; ``engram`` as :func:`~engram.hf.retrofit.retrofit` takes it
    (``None``: :func:`~engram.hf.retrofit.default_engram_config`)."""

    layers: list[int]
    engram: EngramConfig | None = None
    name: str = field(default="engram", init=False)

    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Retrofit ``model`` in place, freeze everything else, make the tables' gradients sparse; returns it."""
        retrofit(model, tokenizer, self.layers, self.engram)
        freeze_base(model)
        enable_sparse_tables(getattr(model, ATTRIBUTE))
        return model

    def save(self, model: nn.Module, folder: str | os.PathLike[str]) -> Path:
        """:func:`~engram.hf.retrofit.save_adapter`."""
        return save_adapter(model, folder)


@dataclass
class LoraInjection:
    """peft LoRA of ``rank`` on ``target_modules`` (peft's names; ``"all-linear"``: every linear layer but the LM
    head), scaled by ``alpha / rank`` (``alpha`` ``None``: ``rank``, a scale of 1), no dropout, no bias."""

    rank: int
    alpha: float | None = None
    target_modules: str | list[str] = "all-linear"
    name: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """The peft model wrapping ``model`` (its LoRA matrices the only trainable parameters)."""
        from peft import LoraConfig, get_peft_model  # optional: the hf extra

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                            target_modules=self.target_modules, lora_dropout=0.0, bias="none")
        return get_peft_model(model, config)

    def save(self, model: nn.Module, folder: str | os.PathLike[str]) -> Path:
        """peft's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)."""
        model.save_pretrained(folder)
        return Path(folder)


def trainable_parameters(model: nn.Module) -> int:
    """Elements of the parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_adapter(model: nn.Module, batches: TokenBatches, steps: int, optim: OptimConfig, device: torch.device,
                  label: str = "training", progress: bool = False) -> list[float]:
    """``steps`` optimiser steps on ``batches.batch(step)`` over the trainable parameters of ``model`` (on
    ``device``; bf16 autocast on CUDA, fp32 elsewhere). The model's train/eval mode is left as it is (a frozen
    base usually stays in eval mode). Returns the loss of every step."""
    optimizer = EngramOptimizer(model, optim)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses: list[torch.Tensor] = []

    def step_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = batch_loss(model, inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        losses.append(loss.detach())
        return loss

    run_steps(optimizer, batches, steps, step_loss, label, Console(), progress)
    return [float(loss) for loss in losses]
