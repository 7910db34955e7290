"""Retrofit training: add Engram layers to a local transformers causal LM, train only them on text, save the
adapter (:func:`~engram.hf.retrofit.save_adapter`).

The base stays frozen and in eval mode. The Engram tables train with sparse gradients and ``SparseAdam``, the
other Engram weights (value/key projections, norms, ShortConv) with AdamW, both through
:class:`~engram.train.optim.EngramOptimizer` (:func:`~engram.hf.injection.train_adapter`: bf16 autocast on CUDA).
The text is prepared with the model's own ``tokenizer.json``
(:func:`~engram.data.corpus.load_or_prepare`); the loss on held-out windows of its validation split is measured
before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from engram.data.batches import TokenBatches, validation_batches
from engram.data.corpus import load_or_prepare
from engram.hf.evaluate import held_out_loss
from engram.hf.injection import EngramInjection, train_adapter
from engram.hf.export import check_exportable, export_engram_lm
from engram.hf.retrofit import save_adapter
from engram.parallel.distributed import resolve_device
from engram.tokenizer import resolve_tokenizer_path
from engram.train.optim import OptimConfig
from engram.train.retrofit import RetrofitConfig


@dataclass
class RetrofitResult:
    """A finished retrofit: the trained model (base + Engram layers), its mean held-out loss (nats per token)
    before and after training, and the last training batch's loss."""

    model: nn.Module
    val_loss_before: float
    val_loss_after: float
    final_loss: float


def load_base(folder: str) -> tuple[nn.Module, object]:
    """The causal LM and tokenizer of local folder ``folder`` (no hub), the model in eval mode."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def train_retrofit(cfg: RetrofitConfig) -> RetrofitResult:
    """Retrofit the model of ``cfg.model`` with Engram layers before ``cfg.layers``, train them on ``cfg.data``
    and save the adapter into ``cfg.out``.

    Raises:
        FileNotFoundError: ``cfg.model`` is not a folder.
        ValueError: the folder holds no ``tokenizer.json``, a layer is out of range, ``seq_len`` exceeds the
            model's positions, or the data is too short for one window.

    Example:
        >>> cfg = RetrofitConfig("my-llama", [1, 5], "facts-adapter", ["facts.txt"], steps=100)
        >>> result = train_retrofit(cfg)  # doctest: +SKIP
    """
    console = Console()
    device = resolve_device(cfg.device)
    model, tokenizer = load_base(cfg.model)
    tokenizer_file = resolve_tokenizer_path(cfg.model)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.seq_len > positions:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {positions}")
    if cfg.export is not None:
        check_exportable(model.config)  # before minutes of training, not after
    torch.manual_seed(cfg.seed)
    EngramInjection(cfg.layers).attach(model, tokenizer).to(device)

    corpus = load_or_prepare(cfg.data, tokenizer=str(tokenizer_file), progress=cfg.progress)
    held_out = validation_batches(corpus.tokens("val"), cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    train_batches = TokenBatches(corpus.tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed)
    before = held_out_loss(model, held_out, device)

    losses = train_adapter(model, train_batches, cfg.steps,
                           OptimConfig(lr=cfg.lr, weight_decay=0.0, warmup_steps=max(1, cfg.steps // 10)), device,
                           "retrofitting", cfg.progress)
    after = held_out_loss(model, held_out, device)

    save_adapter(model, cfg.out, base_reference=cfg.model)
    console.print(f"held-out loss: {before:.4f} -> {after:.4f} after {cfg.steps} steps; "
                  f"adapter written to {cfg.out}", markup=False, soft_wrap=True)
    if cfg.export is not None:
        export_engram_lm(model, tokenizer, cfg.export)
        console.print(f"EngramLM folder written to {cfg.export} (engram serve --checkpoint {cfg.export})",
                      markup=False, soft_wrap=True)
    return RetrofitResult(model, before, after, losses[-1])
